"""The adapter invariants as a matrix, as PEFT's tests/test_custom_models.py: each row of CASES is a base model and
an adapter config; each test of TestInvariants is one invariant, a column run for every row. Add a row (a `Case`: a
name, a function building the base model with the same weights on every call, one making a fresh PEFT config, the
model's input, the adapted weights' dtype) and it gets every check.

Rows: MoRA, each compression, on a small custom network whose one adapted layer is a Linear or Conv1D of several
shapes, in fp32 or bf16, or a bitsandbytes-quantized Linear (NF4 4-bit, LLM.int8 8-bit; both run on the CPU); the
LoRA and DoRA modules of a mixed MoRA adapter (``layer_methods``) on that network, in the same dtypes; and tiny real LlamaForCausalLM and
GPT2LMHeadModel with MoRA, mixed MoRA/LoRA and MoRA/DoRA adapters and, for comparison, PEFT's LoRA and DoRA.

Columns: output unchanged at init; merged output equals unmerged (a merge adds ΔW in float32, rounded once to the
weight's dtype), and merging twice is a no-op; merge_and_unload leaves a plain model that computes the same; unmerge
restores the weights; save/load round-trips exactly; only adapter parameters receive gradients, and training lowers
the loss and changes nothing else; the disabled adapter equals the base model; ΔW is laid out like its weight.
Adapter weights are random and non-zero (`moraft.testing.randomize_adapter`) wherever a zero could let a check pass
trivially.

A quantized base cannot hold W0 + ΔW exactly: merging stores it rounded to the quantization grid, as a merged LoRA is.
There "equals" means within that rounding, bounded from the grid itself (half the widest gap between NF4 levels times
the block's absmax; half of int8's step, the row's absmax / 127), never a loose tolerance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from quantized import QUANTIZED, dequantized, quantize, rounding, within_rounding
from torch import nn
from transformers.pytorch_utils import Conv1D

from moraft import COMPRESSIONS, MoraConfig, MoraModel
from moraft.testing import adapter_parameters, input_ids, randomize_adapter, tiny_gpt2, tiny_llama

# -- the small custom network -------------------------------------------------------------------------------------

# (out d, in k, r): k > d, d > k, square, r̂ larger than both sides, widths that are not multiples of r̂
SHAPES = [(80, 216, 8), (216, 80, 8), (80, 80, 8), (12, 20, 64), (64, 64, 4)]
# The same kinds of shape for a 4-bit base, within what bitsandbytes' own CPU kernel takes (on CPUs with AVX512-BF16
# it needs d % 32 == 0 and k % 64 == 0 for any Linear4bit, adapted or not); r̂ = 45, 45, 43, 78 (> d and k), 16
NF4_SHAPES = [(64, 192, 8), (192, 64, 8), (96, 128, 8), (32, 64, 64), (64, 64, 4)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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

    def output_bound(self, x: torch.Tensor, exact: torch.Tensor, delta: torch.Tensor, kind: str) -> torch.Tensor:
        """How far the output may move when ``lin``'s weight ``exact`` = W0 + ΔW is stored rounded to the ``kind``
        grid: that rounding carried through the rest of the network (tanh is 1-Lipschitz, the head is linear). The
        int8 kernel also rounds each input row to int8 (its absmax / 127 / 2, via float16), which the unmerged ΔW·x
        does not see, and computes in float16."""
        with torch.no_grad():
            h = self.embed(x)  # the adapted layer's input
            spread = h.abs() @ rounding(exact, kind).T
            if kind == "int8":
                input_rounding = h.abs().amax(-1, keepdim=True) / 127 / 2 + h.abs() * 2**-10
                spread = spread + input_rounding @ delta.abs().T + (h.abs() @ exact.abs().T) * 2**-9
            return spread @ self.head.weight.abs().T


def net(d: int, k: int, layer: str, dtype: str, seed: int = 0) -> Net:
    """The same weights for the same seed; quantized for nf4/int8 rows."""
    torch.default_generator.manual_seed(seed)  # torch.manual_seed would also queue a seed for each accelerator: slow
    if dtype in QUANTIZED:
        model = Net(d, k, layer)
        model.lin = quantize(model.lin, dtype)
        return model
    return Net(d, k, layer).to(DTYPES[dtype])


def net_inputs(dtype: str, seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(seed)).to(DTYPES.get(dtype, torch.float32))


# -- the rows -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A row: the base model (the same weights on every call), a fresh adapter config, the model's input."""

    name: str
    base: Callable[[], nn.Module]
    config: Callable[[], PeftConfig]
    inputs: Callable[[], torch.Tensor] = input_ids
    dtype: str = "fp32"  # of the adapted weights: fp32, bf16, fp16, or a QUANTIZED kind

    def __str__(self) -> str:
        return self.name


NET_ROWS = [
    Case(f"{c}-{d}x{k}-r{r}-{layer}-{dtype}", partial(net, d, k, layer, dtype),
         partial(MoraConfig, r=r, compression=c, target_modules=["lin"]), partial(net_inputs, dtype), dtype)
    for c in COMPRESSIONS
    for layer, dtype, shapes in (
        *(("linear", dtype, SHAPES) for dtype in ("fp32", "bf16", "int8")),
        *(("conv1d", dtype, SHAPES) for dtype in ("fp32", "bf16")),
        ("linear", "nf4", NF4_SHAPES),
    )
    for d, k, r in shapes
] + [
    # MoraConfig(layer_methods=...) giving the one layer PEFT's LoRA or DoRA (the other layers of a mixed adapter
    # stay MoRA: the model rows below)
    Case(f"mixed-{method}-{d}x{k}-r{r}-{layer}-{dtype}", partial(net, d, k, layer, dtype),
         partial(MoraConfig, r=r, target_modules=["lin"], layer_methods={"lin": method}, lora_alpha=12),
         partial(net_inputs, dtype), dtype)
    for method in ("lora", "dora")
    for layer, dtype, shapes in (
        *(("linear", dtype, SHAPES[:2]) for dtype in ("fp32", "bf16", "int8")),
        *(("conv1d", dtype, SHAPES[:2]) for dtype in ("fp32", "bf16")),
        ("linear", "nf4", NF4_SHAPES[:2]),
    )
    for d, k, r in shapes
]

# one decoder layer (every kind of layer; more would only take longer), widths that are not multiples of r̂
LLAMA = partial(tiny_llama, hidden_size=80, intermediate_size=216, num_layers=1)
GPT2 = partial(tiny_gpt2, hidden_size=48, num_layers=1)
MODEL_ROWS = [
    Case(f"{arch}-{name}", base, partial(config, r=8, target_modules=targets, **kwargs))
    for arch, base, targets, fan_in_fan_out in (
        ("llama", LLAMA, "all-linear", False),
        ("gpt2", GPT2, ["c_attn", "c_proj", "c_fc"], True),  # Conv1D layers
    )
    for name, config, kwargs in (
        *((f"mora-{c}", MoraConfig, dict(compression=c)) for c in COMPRESSIONS),
        ("lora", LoraConfig, dict(fan_in_fan_out=fan_in_fan_out)),
        ("dora", LoraConfig, dict(fan_in_fan_out=fan_in_fan_out, use_dora=True)),
        # one adapter, MoRA on attention, LoRA or DoRA on the MLP (and LoRA on v_proj / c_attn)
        ("mixed-lora", MoraConfig, dict(layer_methods={r"mlp\..*": "lora"})),
        ("mixed-dora", MoraConfig,
         dict(compression="rotation", layer_methods={r"mlp\..*": "dora", "v_proj|c_attn": "lora"})),
    )
] + [
    Case("llama-mora-sharing-fp16", partial(LLAMA, dtype=torch.float16),
         partial(MoraConfig, r=8, compression="sharing", target_modules=["up_proj"]), dtype="fp16"),
]
CASES = NET_ROWS + MODEL_ROWS


# -- what the columns share ---------------------------------------------------------------------------------------


def make(case: Case, random: bool = True) -> PeftModel:
    """The row's PEFT model: with random non-zero adapter weights, or (``random=False``) as the method initialises
    them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r̂² >= d·k warns, tested separately
        model = get_peft_model(case.base(), case.config())
    if random:
        randomize_adapter(model, seed=2)
        if case.dtype in QUANTIZED:  # ΔW as large as W0 (rms), so that it stands out against a 4-bit grid
            lin = only_layer(model)
            with torch.no_grad():
                w0, delta = dequantized(lin.get_base_layer()), lin.get_delta_weight("default")
                grown = lin.mora_M if "default" in lin.mora_M else {"default": lin.mora_lora_B["default"].weight}
                grown["default"].mul_(w0.pow(2).mean().sqrt() / delta.pow(2).mean().sqrt())
    return model


def layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def only_layer(model: nn.Module) -> BaseTunerLayer:
    """The adapted layer of a custom-network row (quantized rows have one, ``lin``)."""
    (layer,) = layers(model).values()
    return layer


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A language model's next-token loss on ``x``, or the custom network's mean squared output."""
    if x.dtype == torch.long:
        return model(input_ids=x, labels=x).loss
    return output(model, x).float().pow(2).mean()


def tol(case: Case) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if case.dtype == "fp32" else dict(atol=3e-2, rtol=3e-2)


def is_dora(case: Case) -> bool:
    """PEFT's DoRA, or a mixed MoRA adapter with DoRA modules."""
    config = case.config()
    return getattr(config, "use_dora", False) or "dora" in getattr(config, "layer_methods", {}).values()


# -- the columns --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
class TestInvariants:
    def test_unchanged_at_init(self, case):
        model = make(case, random=False)
        x = case.inputs()
        with model.disable_adapter():
            base = output(model, x)
        if is_dora(case) and case.dtype != "fp32":
            # DoRA's magnitude starts as ‖W‖ rounded to the weight's dtype (PEFT's update_layer), the norm it is
            # divided by is float32: m/‖W‖ is 1 only within that rounding
            torch.testing.assert_close(output(model, x), base, **tol(case))
            return
        assert torch.equal(output(model, x), base)

    def test_adapter_changes_output_and_merge_matches(self, case):
        model = make(case).eval()
        x = case.inputs()
        with model.disable_adapter():
            base = output(model, x)
        unmerged = output(model, x)
        assert not torch.allclose(unmerged, base, **tol(case)), "a random adapter must change the output"
        if case.dtype in QUANTIZED:
            lin = only_layer(model)
            delta = lin.get_delta_weight("default")
            exact = dequantized(lin.get_base_layer()) + delta
            bound = rounding(exact, case.dtype)
            # a merge that lost the adapter (or added it twice) would leave these weights off by more than the rounding
            assert (delta.abs() > 2 * bound).float().mean() > 0.05, "ΔW must be large against the grid"
            model.merge_adapter()
            within_rounding(dequantized(lin.get_base_layer()), exact, bound)  # one rounding of W0 + ΔW
            limit = model.base_model.model.output_bound(x, exact, delta, case.dtype)
            assert ((output(model, x) - unmerged).abs() <= limit + 1e-5).all()
            model.merge_adapter()  # merging twice is a no-op (PEFT warns)
            if getattr(lin.get_base_layer().weight, "quant_state", None) is not None:
                # the forward above may have let bitsandbytes' CPU kernel round the block scales to bfloat16 (2^-9)
                bound = bound + exact.abs() * 2**-8
            within_rounding(dequantized(lin.get_base_layer()), exact, bound)
            return
        # adapter weights stay float32 on a low-precision base, and the merged weight is W0 + ΔW computed in float32,
        # cast back once (DoRA's is W0 + ΔW rescaled by its magnitude)
        assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())
        expected = {}
        for name, layer in layers(model).items():
            weight = layer.get_base_layer().weight
            expected[name] = (weight.float() + layer.get_delta_weight("default").float()).to(weight.dtype)
        for _ in range(2):  # merging twice is a no-op (PEFT warns)
            model.merge_adapter()
            torch.testing.assert_close(output(model, x), unmerged, **tol(case))
            for name, layer in layers(model).items():
                assert is_dora(case) or torch.equal(layer.get_base_layer().weight, expected[name]), name

    def test_merge_and_unload_leaves_a_plain_model_computing_the_same(self, case):
        model = make(case).eval()
        x = case.inputs()
        unmerged = output(model, x)
        if case.dtype in QUANTIZED:
            lin = only_layer(model)
            delta = lin.get_delta_weight("default")
            exact = dequantized(lin.get_base_layer()) + delta
        merged = model.merge_and_unload()
        assert not layers(merged)
        if case.dtype in QUANTIZED:
            limit = merged.output_bound(x, exact, delta, case.dtype)
            assert ((output(merged, x) - unmerged).abs() <= limit + 1e-5).all()
        else:
            torch.testing.assert_close(output(merged, x), unmerged, **tol(case))

    def test_unmerge_restores_weights(self, case):
        model = make(case)
        if case.dtype in QUANTIZED:  # W0 + ΔW rounded to the grid, then that minus ΔW rounded again
            lin = only_layer(model)
            before = dequantized(lin.get_base_layer())
            delta = lin.get_delta_weight("default")
            model.merge_adapter()
            merged = dequantized(lin.get_base_layer())
            model.unmerge_adapter()
            assert not lin.merged
            bound = rounding(before + delta, case.dtype) + rounding(merged - delta, case.dtype)
            within_rounding(dequantized(lin.get_base_layer()), before, bound)
            return
        before = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers(model).items()}
        model.merge_adapter()
        for name, layer in layers(model).items():
            assert not torch.equal(layer.get_base_layer().weight, before[name]), name
        model.unmerge_adapter()
        for name, layer in layers(model).items():
            assert not layer.merged
            after = layer.get_base_layer().weight
            if case.dtype == "fp32":
                torch.testing.assert_close(after, before[name], atol=1e-6, rtol=0)
            else:  # one low-precision rounding of W + ΔW, then of the difference
                torch.testing.assert_close(after.float(), before[name].float(), atol=2e-2, rtol=1e-2)

    def test_save_load_roundtrip(self, case, tmp_path, monkeypatch):
        # PEFT's model card (README.md, written by other tests) is not what this checks, and costs ~10 ms a row
        monkeypatch.setattr(PeftModel, "create_or_update_model_card", lambda self, output_dir: None)
        model = make(case).eval()
        x = case.inputs()
        expected = output(model, x)
        model.save_pretrained(tmp_path)
        assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        loaded = PeftModel.from_pretrained(case.base(), tmp_path).eval()  # the same base weights as `make` built
        saved, got = adapter_parameters(model), adapter_parameters(loaded)
        assert saved and saved.keys() == got.keys()
        for name, param in saved.items():
            assert got[name].dtype == param.dtype and torch.equal(got[name], param), name
        assert torch.equal(output(loaded, x), expected)

    def test_only_the_adapter_trains(self, case):
        """Only adapter parameters receive gradients (float32, non-zero); a few optimizer steps lower the loss and
        change them, and every other parameter stays as it was, bit for bit."""
        if is_dora(case) and case.dtype == "int8":
            pytest.skip("PEFT 0.21's DoRA drops an 8-bit weight's scales on the CPU after the first step (moraft train "
                        "refuses DoRA on an 8-bit base there)")
        model = make(case).train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        adapter = adapter_parameters(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x = case.inputs()
        first = loss(model, x)
        first.backward()
        assert adapter and {n for n, p in model.named_parameters() if p.grad is not None} == set(adapter)
        for name, param in adapter.items():
            assert param.grad.dtype == torch.float32 and param.grad.abs().sum() > 0, name
        optimizer.step()
        for _ in range(2):
            optimizer.zero_grad()
            loss(model, x).backward()
            optimizer.step()
        with torch.no_grad():
            assert loss(model, x) < 0.98 * first
        for name, param in model.named_parameters():
            changed = not torch.equal(param, before[name])
            assert changed == (name in adapter), f"{name} {'changed' if changed else 'did not train'}"

    def test_disabled_adapter_equals_base(self, case):
        plain = case.base()
        model = make(case)
        x = case.inputs()
        with model.disable_adapter():
            assert torch.equal(output(model, x), output(plain, x))
        model.merge_adapter()
        with model.disable_adapter():  # disabling a merged adapter unmerges it first
            if case.dtype in QUANTIZED:  # two roundings (merge, unmerge) of the weight, carried to the output
                out = output(model, x)
                lin = only_layer(model)
                assert not lin.merged
                limit = plain.output_bound(x, dequantized(plain.lin), lin.get_delta_weight("default"), case.dtype)
                assert ((out - output(plain, x)).abs() <= 2 * limit + 1e-5).all()
            else:
                torch.testing.assert_close(output(model, x), output(plain, x), **tol(case))

    def test_delta_is_laid_out_like_its_weight(self, case):
        """get_delta_weight is shaped as the layer's weight ((in, out) for a Conv1D); MoRA's delta_weights() as
        (out, in) for every layer."""
        model = make(case)
        for name, layer in layers(model).items():
            if case.dtype not in QUANTIZED:  # a quantized weight is stored packed
                assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape, name
        if isinstance(model.base_model, MoraModel):
            deltas = model.base_model.delta_weights()
            assert deltas.keys() == {name.removeprefix("base_model.model.") for name in layers(model)}
            for name, layer in layers(model).items():
                assert deltas[name.removeprefix("base_model.model.")].shape == (layer.out_features, layer.in_features)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_merge_into_a_4bit_weight_repacked_for_the_cpu_kernel(compression):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first eval forward (codes reordered, scales
    transposed and rounded to bfloat16), a layout ``dequantize_4bit`` misreads. Repacked here by bitsandbytes' own
    function, so that every machine checks the merge of such a weight, whatever its CPU."""
    import bitsandbytes.functional as bnbf

    (case,) = [c for c in NET_ROWS if c.name == f"{compression}-64x192-r8-linear-nf4"]
    model = make(case).eval()
    lin = only_layer(model)
    weight = lin.get_base_layer().weight
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    current = dequantized(lin.get_base_layer())  # what the layer computes with now
    delta = lin.get_delta_weight("default")
    model.merge_adapter()
    within_rounding(dequantized(lin.get_base_layer()), current + delta, rounding(current + delta, "nf4"))
