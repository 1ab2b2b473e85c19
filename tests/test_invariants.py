"""The adapter invariants, as a matrix: compression × layer shape × base, where the base is a Linear or Conv1D in
fp32 or bf16, or a bitsandbytes-quantized Linear (NF4 4-bit, LLM.int8 8-bit; both run on the CPU).

Each column is one invariant: output unchanged at init; merged output equals unmerged output; unmerge restores the
weights; save/load round-trips exactly; only adapter parameters receive gradients; the disabled adapter equals the
base model. M is random and non-zero (``init_weights=False``) wherever a zero M could let a check pass trivially.

A quantized base cannot hold W0 + ΔW exactly: merging stores it rounded to the quantization grid, as a merged LoRA is.
There "equals" means within that rounding, bounded from the grid itself (half the widest gap between NF4 levels times
the block's absmax; half of int8's step, the row's absmax / 127), never a loose tolerance.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from quantized import QUANTIZED, dequantized, quantize, rounding, within_rounding
from torch import nn
from transformers.pytorch_utils import Conv1D

from moraft import COMPRESSIONS, MoraConfig, MoraLayer

# (out d, in k, r): k > d, d > k, square, r̂ larger than both sides, widths that are not multiples of r̂
SHAPES = [(80, 216, 8), (216, 80, 8), (80, 80, 8), (12, 20, 64), (64, 64, 4)]
# The same kinds of shape for a 4-bit base, within what bitsandbytes' own CPU kernel takes (on CPUs with AVX512-BF16
# it needs d % 32 == 0 and k % 64 == 0 for any Linear4bit, adapted or not); r̂ = 45, 45, 43, 78 (> d and k), 16
NF4_SHAPES = [(64, 192, 8), (192, 64, 8), (96, 128, 8), (32, 64, 64), (64, 64, 4)]
LAYERS = ["linear", "conv1d"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Net(nn.Module):
    """One adaptable layer between two fixed ones, so gradients must flow through the adapter's input too."""

    def __init__(self, d: int, k: int, layer: str) -> None:
        super().__init__()
        self.embed = nn.Linear(6, k)
        self.lin = nn.Linear(k, d) if layer == "linear" else Conv1D(d, k)
        if layer == "conv1d":
            nn.init.normal_(self.lin.weight, std=0.1)
            nn.init.normal_(self.lin.bias, std=0.1)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(self.embed(x))))


def base_net(d, k, layer, dtype, seed=0) -> Net:
    """The base network of a row: the same weights for the same seed, quantized for nf4/int8 rows."""
    torch.manual_seed(seed)
    if dtype in QUANTIZED:
        net = Net(d, k, layer)
        net.lin = quantize(net.lin, dtype)
        return net
    return Net(d, k, layer).to(DTYPES[dtype])


def make(d, k, r, layer, dtype, compression, init_weights=False, seed=0):
    net = base_net(d, k, layer, dtype, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r̂² >= d·k warns, tested separately
        config = MoraConfig(r=r, compression=compression, target_modules=["lin"], init_weights=init_weights)
        model = get_peft_model(net, config)
    if dtype in QUANTIZED and not init_weights:  # ΔW as large as W0 (rms), so that it stands out against a 4-bit grid
        lin = mora_layer(model)
        with torch.no_grad():
            scale = dequantized(lin.get_base_layer()).pow(2).mean().sqrt() / lin.get_delta_weight("default").pow(2).mean().sqrt()
            lin.mora_M["default"].mul_(scale)
    return model


def inputs(dtype, seed=1):
    torch.manual_seed(seed)
    return torch.randn(4, 5, 6).to(DTYPES.get(dtype, torch.float32))


def tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == "fp32" else dict(atol=3e-2, rtol=3e-2)


MATRIX = [
    pytest.param(c, d, k, r, layer, dtype, id=f"{c}-{d}x{k}-r{r}-{layer}-{dtype}")
    for c in COMPRESSIONS
    for layer, dtype, shapes in (
        *(("linear", dtype, SHAPES) for dtype in (*DTYPES, "int8")),
        *(("conv1d", dtype, SHAPES) for dtype in DTYPES),
        ("linear", "nf4", NF4_SHAPES),
    )
    for d, k, r in shapes
]


def mora_layer(model) -> MoraLayer:
    return model.base_model.model.lin


@pytest.mark.parametrize("compression,d,k,r,layer,dtype", MATRIX)
def test_unchanged_at_init(compression, d, k, r, layer, dtype):
    model = make(d, k, r, layer, dtype, compression, init_weights=True)
    x = inputs(dtype)
    with model.disable_adapter():
        base = model(x)
    assert torch.equal(model(x), base)


def merged_output_bound(model, x, exact: torch.Tensor, delta: torch.Tensor, kind: str) -> torch.Tensor:
    """How far the merged model's output may be from the unmerged one's when the merged weight ``exact`` = W0 + ΔW is
    stored rounded: that rounding carried through the rest of the network (tanh is 1-Lipschitz, the head is linear).
    The int8 kernel also rounds each input row to int8 (its absmax / 127 / 2, via float16), which the unmerged ΔW·x
    does not see, and computes in float16."""
    net = model.base_model.model
    with torch.no_grad():
        h = net.embed(x)  # the adapted layer's input
        spread = h.abs() @ rounding(exact, kind).T
        if kind == "int8":
            input_rounding = h.abs().amax(-1, keepdim=True) / 127 / 2 + h.abs() * 2**-10
            spread = spread + input_rounding @ delta.abs().T + (h.abs() @ exact.abs().T) * 2**-9
        return spread @ net.head.weight.abs().T


@pytest.mark.parametrize("compression,d,k,r,layer,dtype", MATRIX)
def test_adapter_changes_output_and_merge_matches(compression, d, k, r, layer, dtype):
    model = make(d, k, r, layer, dtype, compression).eval()
    x = inputs(dtype)
    with model.disable_adapter():
        base = model(x)
    unmerged = model(x)
    assert not torch.allclose(unmerged, base, **tol(dtype)), "a random M must change the output"
    if dtype in QUANTIZED:
        lin = mora_layer(model)
        delta = lin.get_delta_weight("default")
        exact = dequantized(lin.get_base_layer()) + delta
        bound = rounding(exact, dtype)
        # a merge that lost the adapter (or added it twice) would leave these weights off by more than the rounding
        assert (delta.abs() > 2 * bound).float().mean() > 0.05, "ΔW must be large against the grid"
        model.merge_adapter()
        within_rounding(dequantized(lin.get_base_layer()), exact, bound)  # one rounding of W0 + ΔW
        assert ((model(x) - unmerged).abs() <= merged_output_bound(model, x, exact, delta, dtype) + 1e-5).all()
        model.merge_adapter()  # merging twice is a no-op (PEFT warns)
        if getattr(lin.get_base_layer().weight, "quant_state", None) is not None:
            # the forward above may have let bitsandbytes' CPU kernel round the block scales to bfloat16 (2^-9)
            bound = bound + exact.abs() * 2**-8
        within_rounding(dequantized(lin.get_base_layer()), exact, bound)
        return
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, **tol(dtype))
    model.merge_adapter()  # merging twice is a no-op (PEFT warns)
    torch.testing.assert_close(model(x), unmerged, **tol(dtype))


@pytest.mark.parametrize("compression,d,k,r,layer,dtype", MATRIX)
def test_unmerge_restores_weights(compression, d, k, r, layer, dtype):
    model = make(d, k, r, layer, dtype, compression)
    lin = mora_layer(model)
    if dtype in QUANTIZED:  # W0 + ΔW rounded to the grid, then that minus ΔW rounded again
        before = dequantized(lin.get_base_layer())
        delta = lin.get_delta_weight("default")
        model.merge_adapter()
        merged = dequantized(lin.get_base_layer())
        model.unmerge_adapter()
        assert not lin.merged
        within_rounding(dequantized(lin.get_base_layer()), before, rounding(before + delta, dtype) + rounding(merged - delta, dtype))
        return
    before = lin.get_base_layer().weight.detach().clone()
    model.merge_adapter()
    assert not torch.equal(lin.get_base_layer().weight, before)
    model.unmerge_adapter()
    after = lin.get_base_layer().weight
    if dtype == "fp32":
        torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    else:  # one bf16 rounding of W + ΔW, then of the difference
        torch.testing.assert_close(after.float(), before.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("compression,d,k,r,layer,dtype", MATRIX)
def test_save_load_roundtrip(compression, d, k, r, layer, dtype, tmp_path):
    model = make(d, k, r, layer, dtype, compression).eval()
    x = inputs(dtype)
    expected = model(x)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    base = base_net(d, k, layer, dtype)  # the same base weights as `make` built
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    m_saved = mora_layer(model).mora_M["default"]
    m_loaded = mora_layer(loaded).mora_M["default"]
    assert m_loaded.dtype == m_saved.dtype and torch.equal(m_loaded, m_saved)
    assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("compression,d,k,r,layer,dtype", MATRIX)
def test_only_adapter_parameters_get_gradients(compression, d, k, r, layer, dtype):
    model = make(d, k, r, layer, dtype, compression).train()
    model(inputs(dtype)).float().pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"base_model.model.lin.mora_M.default"}
    grad = mora_layer(model).mora_M["default"].grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


@pytest.mark.parametrize("compression,d,k,r,layer,dtype", MATRIX)
def test_disabled_adapter_equals_base(compression, d, k, r, layer, dtype):
    plain = base_net(d, k, layer, dtype)
    model = make(d, k, r, layer, dtype, compression)
    x = inputs(dtype)
    with model.disable_adapter():
        assert torch.equal(model(x), plain(x))
    model.merge_adapter()
    with model.disable_adapter():  # disabling a merged adapter unmerges it first
        if dtype in QUANTIZED:  # two roundings (merge, unmerge) of the weight, carried to the output
            out = model(x)
            lin = mora_layer(model)
            assert not lin.merged
            exact = dequantized(plain.lin)
            limit = merged_output_bound(model, x, exact, lin.get_delta_weight("default"), dtype)
            assert ((out - plain(x)).abs() <= 2 * limit + 1e-5).all()
        else:
            torch.testing.assert_close(model(x), plain(x), **tol(dtype))


@pytest.mark.parametrize("dtype", ["bf16"])
def test_low_precision_base_keeps_fp32_adapter_and_merges_in_fp32(dtype):
    model = make(80, 216, 8, "linear", dtype, "rotation")
    lin = mora_layer(model)
    assert lin.mora_M["default"].dtype == torch.float32
    base_weight = lin.get_base_layer().weight.detach().clone()
    expected = (base_weight.float() + lin.get_delta_weight("default")).to(torch.bfloat16)
    model.merge_adapter()
    assert lin.get_base_layer().weight.dtype == torch.bfloat16
    assert torch.equal(lin.get_base_layer().weight, expected)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_merge_into_a_4bit_weight_repacked_for_the_cpu_kernel(compression):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first eval forward (codes reordered, scales
    transposed and rounded to bfloat16), a layout ``dequantize_4bit`` misreads. Repacked here by bitsandbytes' own
    function, so that every machine checks the merge of such a weight, whatever its CPU."""
    import bitsandbytes.functional as bnbf

    model = make(64, 192, 8, "linear", "nf4", compression).eval()
    lin = mora_layer(model)
    weight = lin.get_base_layer().weight
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    current = dequantized(lin.get_base_layer())  # what the layer computes with now
    delta = lin.get_delta_weight("default")
    model.merge_adapter()
    within_rounding(dequantized(lin.get_base_layer()), current + delta, rounding(current + delta, "nf4"))
