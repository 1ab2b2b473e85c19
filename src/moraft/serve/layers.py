"""Per-row adapters inside one forward pass: every Linear/Conv1D of the served base model is wrapped in a
``ServedLinear`` that adds, to each batch row, the delta of that row's adapter.

The engine sets the batch's row -> adapter assignment (``RowAdapters.assign``) before each forward. Each wrapped
module then groups the rows (as the core's ``MoraLayer._mixed_batch_forward`` does), but by *operator* rather than
by adapter, so that 64 adapters trained with one config cost a few batched kernels instead of 64 loops:

    MoRA, adapters sharing an operator (same r̂, compression, ...), rows G, x: (G, T, k)
        z = op.rotate_blocks(op.compress(x))   (G, T, nb, r̂)   once for all rows (R_i z_i: rotation only)
        y = z @ M_rowᵀ                         per-row M (G, r̂, r̂), one batched matmul
        delta = op.decompress(y)               (G, T, d)
    This is ``op.apply(x, M)`` row by row, since ``block_weights(M)`` is M·R_i (``rotate_blocks``' docstring). A
    group with one adapter, or few adapters for many rows, multiplies each adapter's rows together (``_Group``),
    reading each M once.

    LoRA, rows G:  delta = ((x @ A_rowᵀ) @ B_rowᵀ) · scaling_row, with A, B zero-padded to the largest rank in the
    batch (exact: the padded rank components are zero); one adapter, or few: PEFT's B(A(x))·scaling per adapter.

    DoRA (modules of mixed MoRA adapters), rows G: LoRA's delta, then (f_row − 1)·W x + f_row·delta with
    f = m / ‖W + s·BA‖ per output row, computed when the adapter is loaded.

Deltas are computed in float32 (as the core and PEFT do for fp32 adapters) and added in the base output's dtype.
The plans (stacked weights, row indices) are built once per batch composition and reused by every decode step that
has the same rows.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..mora.operators import MoraOperator
from .adapters import DoraWeights, LoadedAdapter, LoraWeights, ModuleShape, MoraWeights


class _Group:
    """Rows of one batch whose adapters are computed the same way on one module.

    Three ways, chosen by how many distinct adapters U the G rows use:
        single    U = 1: one adapter for all rows, plain matmuls.
        segments  U <= G/4: rows sorted by adapter, one matmul per adapter (each weight read once).
        rows      otherwise: one batched matmul with a (pre-gathered, contiguous) weight per row.
    """

    def __init__(self, rows: Optional[torch.Tensor], slots: list[int], distinct: int, device: torch.device) -> None:
        self.rows = rows  # None: every row of the batch
        g = len(slots)
        self.mode = "single" if distinct == 1 else "segments" if distinct * 4 <= g else "rows"
        if self.mode == "segments":
            order = sorted(range(g), key=lambda row: slots[row])
            self.order = torch.tensor(order, device=device)
            self.unorder = torch.argsort(self.order)
            self.segments: list[tuple[int, int, int]] = []  # (first sorted row, end, slot)
            for i, row in enumerate(order):
                if self.segments and self.segments[-1][2] == slots[row]:
                    self.segments[-1] = (self.segments[-1][0], i + 1, slots[row])
                else:
                    self.segments.append((i, i + 1, slots[row]))
        self.slot_index = torch.tensor(slots, device=device)

    def by_segment(self, x: torch.Tensor, fn) -> torch.Tensor:
        """``fn(rows of one adapter, slot)`` for each adapter, put back in row order."""
        xs = x.index_select(0, self.order)
        out = torch.cat([fn(xs[a:b], slot) for a, b, slot in self.segments])
        return out.index_select(0, self.unorder)


class _MoraGroup(_Group):
    """Rows whose adapters share one MoRA operator (same r̂, compression, ...) on this module."""

    def __init__(self, rows: Optional[torch.Tensor], weights: list[MoraWeights], slots: list[int]) -> None:
        device = weights[0].m.device
        super().__init__(rows, slots, len(weights), device)
        self.op: MoraOperator = weights[0].op
        self.m = [w.m for w in weights]
        if self.mode == "rows":  # Mᵀ of each row, contiguous: batched matmuls run about 2x faster than on a view
            self.m_rows_t = torch.stack(self.m).index_select(0, self.slot_index).transpose(1, 2).contiguous()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        op = self.op
        z = op.rotate_blocks(op.compress(x))  # (G, T, nb, r̂)
        if self.mode == "single":  # op.apply(x, M), with the rotation on z: one matmul instead of nb
            y = z @ self.m[0].T
        elif self.mode == "segments":
            y = self.by_segment(z, lambda zs, slot: zs @ self.m[slot].T)
        else:
            g, rank = z.shape[0], z.shape[-1]
            y = torch.bmm(z.reshape(g, -1, rank), self.m_rows_t).reshape(z.shape)
        return op.decompress(y)


class _LoraGroup(_Group):
    """Rows with LoRA adapters on this module (ranks may differ: zero-padded to the largest, which is exact)."""

    def __init__(self, rows: Optional[torch.Tensor], weights: list[LoraWeights], slots: list[int]) -> None:
        device = weights[0].a.device
        super().__init__(rows, slots, len(weights), device)
        self.weights = weights
        if self.mode == "rows":
            rank = max(w.a.shape[0] for w in weights)
            k, d = weights[0].a.shape[1], weights[0].b.shape[0]
            a = torch.zeros(len(weights), rank, k, device=device)
            b = torch.zeros(len(weights), d, rank, device=device)
            for i, w in enumerate(weights):
                a[i, : w.a.shape[0]] = w.a
                b[i, :, : w.a.shape[0]] = w.b
            self.a_rows_t = a.index_select(0, self.slot_index).transpose(1, 2).contiguous()  # (G, k, r)
            self.b_rows_t = b.index_select(0, self.slot_index).transpose(1, 2).contiguous()  # (G, r, d)
            scaling = torch.tensor([w.scaling for w in weights], device=device)
            self.scaling_rows = scaling.index_select(0, self.slot_index).view(-1, 1, 1)

    def _one(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        w = self.weights[slot]
        return (x @ w.a.T) @ w.b.T * w.scaling  # PEFT's lora_B(lora_A(x)) * scaling

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.mode == "single":
            return self._one(x, 0)
        if self.mode == "segments":
            return self.by_segment(x, self._one)
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])  # (G, T, k)
        out = torch.bmm(torch.bmm(x, self.a_rows_t), self.b_rows_t) * self.scaling_rows
        return out.reshape(*shape[:-1], out.shape[-1])


class _DoraGroup(_LoraGroup):
    """Rows with DoRA modules (of mixed MoRA adapters) on this module: LoRA's delta, then each row's output rescaled
    by its adapter's m / ‖W + s·BA‖ (precomputed at load): (f − 1)·W x + f·s·B A x, as PEFT's DoraLinearLayer."""

    needs_base = True

    def __init__(self, rows: Optional[torch.Tensor], weights: list[DoraWeights], slots: list[int]) -> None:
        super().__init__(rows, weights, slots)
        self.factor_rows = torch.stack([w.factor for w in weights]).index_select(0, self.slot_index)  # (G, d)

    def delta(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``base``: the rows' W x, without the base layer's bias."""
        lora = super().delta(x)
        factor = self.factor_rows.view(len(self.factor_rows), *([1] * (x.dim() - 2)), -1)
        return (factor - 1) * base.float() + factor * lora


class RowAdapters:
    """The current batch's row -> adapter assignment, shared by every ``ServedLinear`` of one model."""

    def __init__(self) -> None:
        self._rows: tuple[Optional[LoadedAdapter], ...] = ()
        self._plans: dict[str, list] = {}

    def assign(self, adapters: Sequence[Optional[LoadedAdapter]]) -> None:
        """Set the adapter of each batch row (``None``: the base model) for the next forward passes."""
        adapters = tuple(adapters)
        if len(adapters) != len(self._rows) or any(a is not b for a, b in zip(adapters, self._rows)):
            self._rows = adapters
            self._plans = {}

    @property
    def rows(self) -> tuple[Optional[LoadedAdapter], ...]:
        return self._rows

    def groups(self, path: str) -> list:
        """The delta groups of module ``path`` for the current rows (built on first use, then cached)."""
        plan = self._plans.get(path)
        if plan is None:
            plan = self._plans[path] = self._build(path)
        return plan

    def _build(self, path: str) -> list:
        # group key -> ([row], [distinct weights], [slot of each row in the distinct list])
        found: dict[object, tuple[list[int], list, list[int]]] = {}
        for row, adapter in enumerate(self._rows):
            weights = adapter.modules.get(path) if adapter is not None else None
            if weights is None:
                continue
            rows, distinct, slots = found.setdefault(weights.group_key, ([], [], []))
            for slot, seen in enumerate(distinct):
                if seen is weights:
                    break
            else:
                slot = len(distinct)
                distinct.append(weights)
            rows.append(row)
            slots.append(slot)
        groups = []
        for key, (rows, distinct, slots) in found.items():
            mora = isinstance(key, MoraOperator)
            device = (distinct[0].m if mora else distinct[0].a).device
            index = None if len(rows) == len(self._rows) else torch.tensor(rows, device=device)
            cls = _MoraGroup if mora else _DoraGroup if key == "dora" else _LoraGroup
            groups.append(cls(index, distinct, slots))
        return groups


class ServedLinear(nn.Module):
    """A base ``nn.Linear``/``Conv1D`` plus each row's adapter delta, per the shared ``RowAdapters``."""

    def __init__(self, base_layer: nn.Module, path: str, row_adapters: RowAdapters) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self._row_adapters = row_adapters
        if isinstance(base_layer, Conv1D):
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        groups = self._row_adapters.groups(self.path)
        base = None
        if any(isinstance(group, _DoraGroup) for group in groups):  # W x, before any row's delta is added
            bias = getattr(self.base_layer, "bias", None)
            base = out - bias if bias is not None else out.clone()
        for group in groups:  # ``out`` is the base layer's fresh output: adding in place is safe
            dora = isinstance(group, _DoraGroup)
            if group.rows is None:
                out.add_((group.delta(x, base) if dora else group.delta(x)).to(out.dtype))
            else:
                rows_x = x.index_select(0, group.rows)
                delta = group.delta(rows_x, base.index_select(0, group.rows)) if dora else group.delta(rows_x)
                out.index_add_(0, group.rows, delta.to(out.dtype))
        return out


def _weight(module: nn.Module) -> torch.Tensor:
    """The (d, k) weight of a Linear or Conv1D (stored (k, d))."""
    weight = module.weight.detach()
    return weight.T if isinstance(module, Conv1D) else weight


def wrap_model(model: nn.Module) -> tuple[RowAdapters, dict[str, ModuleShape]]:
    """Wrap every ``nn.Linear``/``Conv1D`` of ``model`` in place; return the shared row assignment and the shapes.

    Every such layer is wrapped (not only those of the adapters seen so far), so that adapters added later need no
    change to the model while it is serving. A wrapped layer with no adapter in the batch costs one dict lookup.
    """
    row_adapters = RowAdapters()
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))]
    shapes: dict[str, ModuleShape] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        served = ServedLinear(module, name, row_adapters)
        setattr(parent, child, served)
        shapes[name] = ModuleShape(served.in_features, served.out_features, partial(_weight, module))
    return row_adapters, shapes
