"""The MoRA tuner layer: wraps a ``torch.nn.Linear`` or transformers ``Conv1D`` and adds
``decompress(M · compress(x))`` for each active adapter (the operators live in ``operators.py``).

Shapes: x (..., k) -> (..., d); one M (r̂, r̂) per adapter, kept in float32 (or the base dtype when PEFT's
``autocast_adapter_dtype=False``); merging computes ΔW in float32 and casts it to the base weight's dtype.

An adapter with ``layer_methods`` gives some modules LoRA or DoRA instead of M (``MoraConfig.method_of``): the
module then holds A (r, k) and B (d, r) as PEFT's LoRA does, and for DoRA the magnitude m (d,) in PEFT's own
``DoraLinearLayer`` (https://arxiv.org/abs/2402.09353):

    LoRA   delta(x) = s · B A dropout(x)                                  s = lora_alpha / r (or / sqrt(r))
    DoRA   out(x)   = m / ‖W + s·BA‖_row · (W x + s · B A x)              the norm detached, as in PEFT

Their parameters are named ``mora_lora_A``, ``mora_lora_B``, ``mora_magnitude`` so that PEFT saves and loads them
with the tuner's ``mora_`` prefix; one layer may hold a MoRA adapter and a LoRA/DoRA adapter at once.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from peft.utils.other import transpose
from torch import nn

from ..errors import UserError
from .config import MoraConfig
from .operators import MoraOperator, mora_rank


class MoraLayer(BaseTunerLayer):
    """PEFT tuner-layer state for MoRA: per adapter name, its method and dropout, and either M and its operator
    (MoRA) or A, B, the scaling (LoRA) and the magnitude (DoRA)."""

    adapter_layer_names = ("mora_M", "mora_lora_A", "mora_lora_B", "mora_magnitude")
    other_param_names = ("mora_operator", "mora_dropout", "mora_method", "mora_scaling")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mora_M = nn.ParameterDict({})
        self.mora_operator: dict[str, MoraOperator] = {}
        self.mora_dropout = nn.ModuleDict({})
        self.mora_method: dict[str, str] = {}  # "mora", "lora" or "dora"
        self.mora_lora_A = nn.ModuleDict({})
        self.mora_lora_B = nn.ModuleDict({})
        self.mora_magnitude = nn.ModuleDict({})  # PEFT's DoraLinearLayer; its ``weight`` is m
        self.mora_scaling: dict[str, float] = {}
        self._initial_scaling: dict[str, float] = {}  # for unscale_layer()
        self._dora_merged: dict[str, torch.Tensor] = {}  # the delta a merged DoRA part added, to take it out again
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        self.fan_in_fan_out = fan_in_fan_out  # Conv1D stores its weight as (in, out)
        self.kwargs = kwargs
        # a quantized base (bitsandbytes 4-bit/8-bit, HQQ, torchao): PEFT's backend dequantizes the weight for a merge
        # and quantizes the merged one again (get_base_weight / set_base_weight); None for a plain weight
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"MoRA cannot adapt a layer of type {type(self.get_base_layer()).__name__}")
        self.in_features, self.out_features = in_features, out_features

    def update_layer(
        self,
        adapter_name: str,
        config: MoraConfig,
        r: int,
        rank: Optional[int] = None,
        module_name: str = "",
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add adapter ``adapter_name``: MoRA with r̂ = ``rank`` (or derived from ``r``), or the LoRA/DoRA of rank
        ``r`` that ``config.layer_methods`` gives ``module_name``."""
        method = config.method_of(module_name)
        self.mora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.mora_method[adapter_name] = method
        if method != "mora":
            self._update_lora(adapter_name, config, r, method)
        else:
            self._update_mora(adapter_name, config, r, rank, module_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if method == "dora":  # m starts at ‖W + s·BA‖ (= ‖W‖ with B = 0), computed where the base weight is
            self.mora_magnitude[adapter_name] = DoraLinearLayer(fan_in_fan_out=self.fan_in_fan_out)
            self.mora_magnitude[adapter_name].update_layer(
                base_layer=self.get_base_layer(),
                lora_A=self.mora_lora_A[adapter_name].weight,
                lora_B=self.mora_lora_B[adapter_name].weight,
                scaling=self.mora_scaling[adapter_name],
            )
            self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _update_lora(self, adapter_name: str, config: MoraConfig, r: int, method: str) -> None:
        _forget(adapter_name, self.mora_M, self.mora_operator, self.mora_magnitude)  # a re-added name changes method
        alpha = config.lora_alpha if config.lora_alpha is not None else 2 * r
        self.mora_scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self._initial_scaling[adapter_name] = self.mora_scaling[adapter_name]
        self.mora_lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.mora_lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        if config.init_weights:  # PEFT's init_lora_weights=True; False keeps nn.Linear's random init, as PEFT does
            self.reset_lora_part(adapter_name)

    def reset_lora_part(self, adapter_name: str) -> None:
        """A LoRA/DoRA module's A and B back to PEFT's init (A Kaiming-uniform, B = 0), as PEFT's
        ``reset_lora_parameters(init_lora_weights=True)`` does; the update is then 0."""
        nn.init.kaiming_uniform_(self.mora_lora_A[adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.mora_lora_B[adapter_name].weight)

    def _update_mora(
        self, adapter_name: str, config: MoraConfig, r: int, rank: Optional[int], module_name: str
    ) -> None:
        _forget(adapter_name, self.mora_lora_A, self.mora_lora_B, self.mora_magnitude, self.mora_scaling)
        expected = mora_rank(self.in_features, self.out_features, r, config.compression)
        if rank is not None and config.peft_mora_compat and rank != expected:
            # a checkpoint converted from peft-mora, which derived r̂ from the layer's shape: another r̂ means the
            # adapter was trained on a base model with other layer shapes
            raise UserError(
                f"{module_name or 'a layer'}: this adapter (converted from peft-mora) has a {rank}x{rank} M, but "
                f"peft-mora gives this {self.out_features}x{self.in_features} layer (r={r}) a {expected}x{expected} "
                "M: the adapter was trained on a base model with other layer shapes"
            )
        op = MoraOperator.from_config(config, self.in_features, self.out_features, r=r, rank=rank)
        rank = op.rank
        op.warn_if_wasteful(module_name)
        self.mora_operator[adapter_name] = op
        m = torch.zeros(rank, rank)
        if not config.init_weights:
            # random, non-zero: for tests that must not pass trivially
            m.normal_(0.0, 1.0 / rank)
        self.mora_M[adapter_name] = nn.Parameter(m)

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of the active LoRA/DoRA modules by ``scale``, as PEFT's LoRA does; MoRA has none."""
        if scale == 1:
            return
        active = [name for name in self.active_adapters if name in self.mora_method]
        if any(self.mora_method[name] == "mora" for name in active):
            warnings.warn("MoRA has no scaling factor; scale_layer is ignored for its MoRA modules.")
        for name in active:
            if name in self.mora_scaling:
                self.mora_scaling[name] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        """Undo `scale_layer` (``None``: back to lora_alpha / r) for the active LoRA/DoRA modules."""
        for name in self.active_adapters:
            if name in self.mora_scaling:
                self.mora_scaling[name] = self._initial_scaling[name] if scale is None else self.mora_scaling[name] / scale

    # -- the math, delegated -------------------------------------------------------------------------------------

    def mora_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``decompress(M · compress(dropout(x)))`` in M's dtype."""
        m = self.mora_M[adapter_name]
        x = self._cast_input_dtype(x, m.dtype)
        return self.mora_operator[adapter_name].apply(self.mora_dropout[adapter_name](x), m)

    def lora_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """PEFT's LoRA: ``B(A(dropout(x))) · scaling`` in A's dtype."""
        a = self.mora_lora_A[adapter_name]
        x = self._cast_input_dtype(x, a.weight.dtype)
        return self.mora_lora_B[adapter_name](a(self.mora_dropout[adapter_name](x))) * self.mora_scaling[adapter_name]

    def dora_output(self, adapter_name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output ``base_result`` of the same ``x``: ``(m/‖W + s·BA‖ − 1) · W x +
        m/‖W + s·BA‖ · s·BA x``, by PEFT's ``DoraLinearLayer`` as PEFT's ``DoraLinearVariant.forward`` calls it."""
        a = self.mora_lora_A[adapter_name]
        x = self._cast_input_dtype(x, a.weight.dtype)
        dropout = self.mora_dropout[adapter_name]
        if not isinstance(dropout, nn.Identity) and self.training:
            x, base_result = dropout(x), None  # W x of the dropped-out x, as PEFT computes it
        return self.mora_magnitude[adapter_name](
            x,
            lora_A=a,
            lora_B=self.mora_lora_B[adapter_name],
            scaling=self.mora_scaling[adapter_name],
            base_layer=self.get_base_layer(),
            base_result=base_result,
            adapter_name=adapter_name,
        )

    def adapter_output(self, adapter_name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """What adapter ``adapter_name`` adds to ``base_result`` (the base layer's output for ``x``)."""
        method = self.mora_method[adapter_name]
        if method == "mora":
            return self.mora_output(adapter_name, x)
        if method == "lora":
            return self.lora_output(adapter_name, x)
        return self.dora_output(adapter_name, x, base_result)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW for ``adapter_name`` in float32, laid out like the base weight ((in, out) for Conv1D).

        For a DoRA part ΔW is what the merge adds, ``m/‖W + s·BA‖ · (W + s·BA) − W``: it depends on the base weight W,
        which is read (dequantized) from the base layer without the adapters merged into it.
        """
        method = self.mora_method[adapter_name]
        if method == "mora":
            m = self.mora_M[adapter_name].detach().float()
            delta = self.mora_operator[adapter_name].delta_weight(m)  # (d, k)
        else:
            a = self.mora_lora_A[adapter_name].weight.detach().float()
            b = self.mora_lora_B[adapter_name].weight.detach().float()
            delta = (b @ a) * self.mora_scaling[adapter_name]  # (d, k), as PEFT's LoRA get_delta_weight
            if method == "dora":
                if adapter_name in self.merged_adapters and adapter_name in self._dora_merged:
                    return self._dora_merged[adapter_name]
                weight = transpose(self._unmerged_weight(), self.fan_in_fan_out)  # (d, k)
                delta = self._dora_delta(adapter_name, weight, delta)
        return delta.T if self.fan_in_fan_out else delta

    def _dora_delta(self, adapter_name: str, weight: torch.Tensor, lora_delta: torch.Tensor) -> torch.Tensor:
        """``m/‖W + ΔW‖ · (W + ΔW) − W`` (d, k) in float32, the norm by PEFT's ``get_weight_norm``."""
        dora = self.mora_magnitude[adapter_name]
        norm = dora.get_weight_norm(transpose(weight, dora.fan_in_fan_out), lora_delta, scaling=1).detach()
        factor = (dora.weight.detach().float() / norm).view(-1, 1)
        return factor * (weight + lora_delta) - weight

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight in float32 without the adapters merged into it (a DoRA norm is taken on that)."""
        _restore_4bit_layout(self.get_base_layer())
        weight = self.get_base_weight().detach().to(torch.float32, copy=True)
        for name in self.merged_adapters:
            weight.sub_(self.get_delta_weight(name).to(weight.device))
        return weight

    # -- merging ---------------------------------------------------------------------------------------------------

    def _add_delta(self, name: str, sign: int, check: bool = False) -> None:
        """W0 += sign · ΔW, computed in float32: in place on a float32 weight, else cast back once. A quantized weight
        is dequantized, updated and quantized again by PEFT's backend, so the merged weight carries one rounding of
        W0 + ΔW, as a merged LoRA does."""
        _restore_4bit_layout(self.get_base_layer())
        weight = self.get_base_weight()
        if sign < 0:
            delta = self._dora_merged.pop(name, None)
            delta = self.get_delta_weight(name) if delta is None else delta
        else:
            delta = self.get_delta_weight(name)
            if self.mora_method[name] == "dora":  # it depends on W, which this merge changes
                self._dora_merged[name] = delta
        delta = delta.to(weight.device)
        if weight.dtype == torch.float32 and not check and self.quantization_backend is None:
            weight.add_(delta, alpha=sign)  # no second copy of the weight
            return
        updated = weight.to(torch.float32, copy=True).add_(delta, alpha=sign)
        if check and not torch.isfinite(updated).all():
            raise ValueError(f"NaNs or infs in the merged weights: adapter {name!r} seems to be broken")
        self.set_base_weight(updated.to(weight.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ΔW of the active (or given) adapters to the base weight, in float32, cast back to its dtype."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.mora_method:
                self._add_delta(name, +1, check=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract ΔW of every merged adapter, newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.mora_method:
                self._add_delta(name, -1)

    # -- forward ---------------------------------------------------------------------------------------------------

    def _check_forward_args(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            return
        # PEFT's LoRA sentences first (code written for PEFT matches them), then what moraft adds
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively. Pass one adapter name (or '__base__') per row."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first. "
                f"(Merged here: {self.merged_adapters}; every row would get them.)"
            )


def _forget(adapter_name: str, *tables) -> None:
    for table in tables:
        if adapter_name in table:
            del table[adapter_name]


def _restore_4bit_layout(base_layer: nn.Module) -> None:
    """Put a bitsandbytes 4-bit weight back in bitsandbytes' own layout before it is dequantized for a merge.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight for its inference kernel at the
    first forward in eval mode: the 4-bit codes are reordered, and the per-block scales become a (k / blocksize, d)
    bfloat16 matrix. ``dequantize_4bit``, which PEFT's backend reads the weight with, understands neither, and returns
    wrong values silently. bitsandbytes' own inverse restores the codes but leaves non-nested scales transposed, so
    they are put back in order here too. The weight is then exactly the one the layer has been computing with (its
    scales rounded to bfloat16, as the kernel used them).
    """
    weight = getattr(base_layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if state.absmax.dim() == 2:  # still (k / blocksize, d): one scale per block of each row, rows in order
        state.absmax = state.absmax.T.reshape(-1).float()
    weight.quant_state = state


class MoraLinear(nn.Module, MoraLayer):
    """MoRA on a ``torch.nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out=True``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: MoraConfig,
        r: int,
        rank: Optional[int] = None,
        fan_in_fan_out: bool = False,
        module_name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        MoraLayer.__init__(self, base_layer, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, r=r, rank=rank, module_name=module_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype, base_result = result.dtype, result
        for name in self.active_adapters:
            if name in self.mora_method:
                result = result + self.adapter_output(name, x, base_result).to(out_dtype)
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Row i gets adapter ``adapter_names[i]`` (``"__base__"``: none)."""
        result = base_result = self.base_layer(x, *args, **kwargs)
        rows_of: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows_of.setdefault(name, []).append(row)
        for name, rows in rows_of.items():
            if name == "__base__" or name not in self.mora_method:
                continue
            index = torch.tensor(rows, device=x.device)
            base_rows = base_result.index_select(0, index)
            delta = self.adapter_output(name, x.index_select(0, index), base_rows).to(result.dtype)
            result = result.index_add(0, index, delta)
        return result

    def __repr__(self) -> str:
        return "mora." + super().__repr__()
