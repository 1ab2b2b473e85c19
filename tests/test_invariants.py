"""The adapter invariants, as a matrix: compression × layer shape × {Linear, Conv1D} × {fp32, bf16}.

Each column is one invariant: output unchanged at init; merged output equals unmerged output; unmerge restores the
weights; save/load round-trips exactly; only adapter parameters receive gradients; the disabled adapter equals the
base model. M is random and non-zero (``init_weights=False``) wherever a zero M could let a check pass trivially.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from moraft import COMPRESSIONS, MoraConfig, MoraLayer

# (out d, in k, r): k > d, d > k, square, r̂ larger than both sides, widths that are not multiples of r̂
SHAPES = [(80, 216, 8), (216, 80, 8), (80, 80, 8), (12, 20, 64), (64, 64, 4)]
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


def make(d, k, r, layer, dtype, compression, init_weights=False, seed=0):
    torch.manual_seed(seed)
    net = Net(d, k, layer).to(DTYPES[dtype])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r̂² >= d·k warns, tested separately
        config = MoraConfig(r=r, compression=compression, target_modules=["lin"], init_weights=init_weights)
        model = get_peft_model(net, config)
    return model


def inputs(dtype, seed=1):
    torch.manual_seed(seed)
    return torch.randn(4, 5, 6).to(DTYPES[dtype])


def tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == "fp32" else dict(atol=3e-2, rtol=3e-2)


MATRIX = [
    pytest.param(c, d, k, r, layer, dtype, id=f"{c}-{d}x{k}-r{r}-{layer}-{dtype}")
    for c in COMPRESSIONS
    for d, k, r in SHAPES
    for layer in LAYERS
    for dtype in DTYPES
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


@pytest.mark.parametrize("compression,d,k,r,layer,dtype", MATRIX)
def test_adapter_changes_output_and_merge_matches(compression, d, k, r, layer, dtype):
    model = make(d, k, r, layer, dtype, compression).eval()
    x = inputs(dtype)
    with model.disable_adapter():
        base = model(x)
    unmerged = model(x)
    assert not torch.allclose(unmerged, base, **tol(dtype)), "a random M must change the output"
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, **tol(dtype))
    model.merge_adapter()  # merging twice is a no-op (PEFT warns)
    torch.testing.assert_close(model(x), unmerged, **tol(dtype))


@pytest.mark.parametrize("compression,d,k,r,layer,dtype", MATRIX)
def test_unmerge_restores_weights(compression, d, k, r, layer, dtype):
    model = make(d, k, r, layer, dtype, compression)
    lin = mora_layer(model)
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
    torch.manual_seed(0)
    base = Net(d, k, layer).to(DTYPES[dtype])  # the same base weights as `make` built
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
    torch.manual_seed(0)
    plain = Net(d, k, layer).to(DTYPES[dtype])
    model = make(d, k, r, layer, dtype, compression)
    x = inputs(dtype)
    with model.disable_adapter():
        assert torch.equal(model(x), plain(x))
    model.merge_adapter()
    with model.disable_adapter():  # disabling a merged adapter unmerges it first
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
