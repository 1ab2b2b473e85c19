"""The MoRA tuner layer: wraps a ``torch.nn.Linear`` or transformers ``Conv1D`` and adds
``decompress(M · compress(x))`` for each active adapter (the operators live in ``operators.py``).

Shapes: x (..., k) -> (..., d); one M (r̂, r̂) per adapter, kept in float32 (or the base dtype when PEFT's
``autocast_adapter_dtype=False``); merging computes ΔW in float32 and casts it to the base weight's dtype.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from ..errors import UserError
from .config import MoraConfig
from .operators import MoraOperator, mora_rank


class MoraLayer(BaseTunerLayer):
    """PEFT tuner-layer state for MoRA: one M, operator and dropout per adapter name."""

    adapter_layer_names = ("mora_M",)
    other_param_names = ("mora_operator", "mora_dropout")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mora_M = nn.ParameterDict({})
        self.mora_operator: dict[str, MoraOperator] = {}
        self.mora_dropout = nn.ModuleDict({})
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
        """Add adapter ``adapter_name`` with r̂ = ``rank`` (or derived from ``r``)."""
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
        self.mora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        m = torch.zeros(rank, rank)
        if not config.init_weights:
            # random, non-zero: for tests that must not pass trivially
            m.normal_(0.0, 1.0 / rank)
        self.mora_M[adapter_name] = nn.Parameter(m)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def scale_layer(self, scale: float) -> None:
        if scale != 1:
            warnings.warn("MoRA has no scaling factor; scale_layer is ignored.")

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        pass

    # -- the math, delegated -------------------------------------------------------------------------------------

    def mora_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``decompress(M · compress(dropout(x)))`` in M's dtype."""
        m = self.mora_M[adapter_name]
        x = self._cast_input_dtype(x, m.dtype)
        return self.mora_operator[adapter_name].apply(self.mora_dropout[adapter_name](x), m)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW for ``adapter_name`` in float32, laid out like the base weight ((in, out) for Conv1D)."""
        m = self.mora_M[adapter_name].detach().float()
        delta = self.mora_operator[adapter_name].delta_weight(m)
        return delta.T if self.fan_in_fan_out else delta

    # -- merging ---------------------------------------------------------------------------------------------------

    def _add_delta(self, name: str, sign: int, check: bool = False) -> None:
        """W0 += sign · ΔW, computed in float32: in place on a float32 weight, else cast back once. A quantized weight
        is dequantized, updated and quantized again by PEFT's backend, so the merged weight carries one rounding of
        W0 + ΔW, as a merged LoRA does."""
        _restore_4bit_layout(self.get_base_layer())
        weight = self.get_base_weight()
        delta = self.get_delta_weight(name).to(weight.device)
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
            if name in self.mora_M:
                self._add_delta(name, +1, check=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract ΔW of every merged adapter, newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.mora_M:
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
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name in self.mora_M:
                result = result + self.mora_output(name, x).to(out_dtype)
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Row i gets adapter ``adapter_names[i]`` (``"__base__"``: none)."""
        result = self.base_layer(x, *args, **kwargs)
        rows_of: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows_of.setdefault(name, []).append(row)
        for name, rows in rows_of.items():
            if name == "__base__" or name not in self.mora_M:
                continue
            index = torch.tensor(rows, device=x.device)
            delta = self.mora_output(name, x.index_select(0, index)).to(result.dtype)
            result = result.index_add(0, index, delta)
        return result

    def __repr__(self) -> str:
        return "mora." + super().__repr__()
