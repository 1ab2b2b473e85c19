"""bitsandbytes-quantized bases for the tests: a Linear quantized on the CPU, the weight it computes with, and the
rounding its grid allows (a bound derived from the grid itself, not a tolerance)."""

from __future__ import annotations

import torch
from torch import nn

QUANTIZED = ("nf4", "int8")  # bitsandbytes Linear4bit (NF4, blocks of 64) and Linear8bitLt (row-wise int8)


def quantize(lin: nn.Linear, kind: str) -> nn.Module:
    """``lin`` as a bitsandbytes layer holding its weight quantized (``kind``: nf4 or int8), on the CPU."""
    import bitsandbytes as bnb

    if kind == "nf4":
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=False)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=False)
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = lin.bias
    return q.to("cpu")  # moving it to a device is what quantizes it


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes layer computes with, read through bitsandbytes itself."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    if hasattr(weight, "quant_state"):  # 4-bit, in bitsandbytes' layout (not the one its CPU kernel repacks it into)
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by its CPU kernel: read the packed layout
            codes = data.view(-1, 32)  # blocks of 32 bytes: low nibbles of rows n..n+31, then their high nibbles
            d, k = state.shape
            nibbles = torch.cat([codes & 0xF, codes >> 4], dim=-1).view(d // 32, k // 2, 32, 2).transpose(1, 2)
            levels = bnbf.get_4bit_type("nf4", device="cpu")
            scales = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)  # (d, k)
            return levels[nibbles.reshape(d, k).long()] * scales
        return bnbf.dequantize_4bit(data, state).float()
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB  # the first forward moves them to the state
    return bnbf.int8_vectorwise_dequant(weight.data, scales).float()


def rounding(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The largest error, per element, of storing ``weight`` (float32, (d, k)) on the ``kind`` grid."""
    if kind == "nf4":
        import bitsandbytes.functional as bnbf

        levels = bnbf.get_4bit_type("nf4", device="cpu").sort().values
        half_gap = (levels[1:] - levels[:-1]).max() / 2
        flat = weight.flatten()
        padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 64))
        absmax = padded.view(-1, 64).abs().amax(1).repeat_interleave(64)[: flat.numel()]
        bound = (half_gap * absmax).view_as(weight)
    else:  # int8: one scale per row, and the weight passes through float16 on its way to the grid
        bound = weight.abs().amax(1, keepdim=True) / 127 / 2 + weight.abs() * 2**-10
    return bound * 1.001 + 1e-7


def within_rounding(stored: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    excess = (stored - exact).abs() - bound
    assert excess.max() <= 0, f"{(excess > 0).sum().item()} weights off the grid's rounding, by up to {excess.max()}"
