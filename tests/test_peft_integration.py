"""MoRA inside real PEFT and real transformers models (tiny, built from a config: no downloads): what PEFT does
beyond one adapter's invariants (those are the matrix of test_invariants.py): several named adapters, mixed-adapter
batches, modules_to_save, target selection, quantized models loaded by transformers."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import moraft
from moraft import MoraConfig, MoraLayer
from moraft.testing import input_ids, tiny_llama


@pytest.mark.parametrize("r, within", [(2, 0.05), (8, 0.02)])
def test_same_rank_same_budget_as_lora(capsys, r, within):
    """At rank r every MoRA layer has r̂² ≈ (d + k)·r parameters: LoRA's budget at the same r, to rounding."""
    mora = get_peft_model(tiny_llama(), MoraConfig(r=r, target_modules="all-linear"))
    lora = get_peft_model(tiny_llama(), LoraConfig(r=r, target_modules="all-linear"))
    mora.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out
    n_mora, n_lora = mora.get_nb_trainable_parameters()[0], lora.get_nb_trainable_parameters()[0]
    assert abs(n_mora - n_lora) / n_lora < within


def test_several_named_adapters(tmp_path):
    model = get_peft_model(
        tiny_llama(), MoraConfig(r=8, compression="sharing", target_modules="all-linear", init_weights=False)
    )
    model.add_adapter("rot", MoraConfig(r=4, compression="rotation", target_modules=["q_proj", "v_proj"], init_weights=False))
    ids = input_ids()
    with torch.no_grad():
        out_default = model(ids).logits
        model.set_adapter("rot")
        out_rot = model(ids).logits
        with model.disable_adapter():
            out_base = model(ids).logits
    assert not torch.allclose(out_default, out_rot)
    assert not torch.allclose(out_rot, out_base)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("mora_M.rot") for n in trainable)

    model.save_pretrained(tmp_path)  # both adapters: default at the root, rot in a subfolder
    assert (tmp_path / "rot" / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "rot", adapter_name="rot")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out_default)
        loaded.set_adapter("rot")
        torch.testing.assert_close(loaded(ids).logits, out_rot)

    model.delete_adapter("rot")
    assert "rot" not in model.peft_config
    assert not any("rot" in m.mora_M for m in model.modules() if isinstance(m, MoraLayer))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, out_default)
    unloaded = model.unload()
    with torch.no_grad():
        torch.testing.assert_close(unloaded(ids).logits, out_base)


def test_modules_to_save(tmp_path):
    config = MoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"], init_weights=False)
    model = get_peft_model(tiny_llama(), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head" in n for n in trainable) and any("mora_M" in n for n in trainable)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
        expected = model(input_ids()).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids()).logits, expected)


@pytest.fixture
def two_adapter_model():
    model = get_peft_model(
        tiny_llama(), MoraConfig(r=8, compression="sharing", target_modules="all-linear", init_weights=False),
        adapter_name="one",
    )
    torch.manual_seed(5)
    model.add_adapter("two", MoraConfig(r=8, compression="rotation", target_modules="all-linear", init_weights=False))
    return model.eval()


def test_mixed_adapter_batch_forward(two_adapter_model):
    model = two_adapter_model
    ids = input_ids(rows=4)
    names = ["one", "two", "__base__", "two"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(ids[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_mixed_adapter_batch_generate(two_adapter_model):
    model = two_adapter_model
    ids = input_ids(rows=3, length=6)
    names = ["two", "__base__", "one"]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=ids[row : row + 1], **kwargs)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=ids[row : row + 1], **kwargs)
            assert torch.equal(mixed[row], alone[0])


def _error(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


def test_mixed_adapter_batch_errors_open_with_peft_sentences(two_adapter_model):
    """Each mixed-batch error opens with the sentence PEFT's LoRA raises in the same situation (code and tests written
    for PEFT match on it); moraft's hint follows."""
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"), adapter_name="one")
    lora.add_adapter("two", LoraConfig(r=4, target_modules="all-linear"))
    lora.eval()
    mora = two_adapter_model
    ids = input_ids(rows=2)
    cases = {
        "unknown adapter": lambda m: m(ids, adapter_names=["one", "c"]),
        "length": lambda m: m(ids, adapter_names=["one", "two", "one"]),
        "training": lambda m: m.train()(ids, adapter_names=["one", "two"]),
        "merged": lambda m: (m.eval(), m.merge_adapter(["one"]), m(ids, adapter_names=["one", "two"])),
    }
    for case, call in cases.items():
        peft_says, moraft_says = _error(lambda: call(lora)), _error(lambda: call(mora))
        assert moraft_says.startswith(peft_says), (case, peft_says, moraft_says)
        lora.eval(), mora.eval()
    assert "Trying to infer with non-existing adapter(s): c. (Known: one, two, and '__base__'" in _error(
        lambda: (mora.unmerge_adapter(), mora(ids, adapter_names=["one", "c"]))
    )


def test_warns_when_full_training_is_cheaper():
    with pytest.warns(UserWarning, match="at least as many as the full"):
        get_peft_model(tiny_llama(), MoraConfig(r=64, target_modules=["q_proj"]))


def test_registration_is_visible_to_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING["MORA"] is MoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["MORA"] is moraft.MoraModel
    assert MoraConfig().peft_type.value == "MORA"


def test_target_selection_and_rank_patterns():
    config = MoraConfig(
        r=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        exclude_modules=["model.layers.0.self_attn.v_proj"],
        layers_to_transform=[0],
        layers_pattern="layers",
        rank_pattern={"q_proj": 2},
        mora_rank_pattern={"down_proj": 10},
        dropout=0.1,
    )
    model = get_peft_model(tiny_llama(), config)
    adapted = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, MoraLayer)}
    assert set(adapted) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    assert adapted["model.layers.0.self_attn.q_proj"].mora_operator["default"].rank == 16  # sqrt(128 * 2) = 16
    assert adapted["model.layers.0.mlp.down_proj"].mora_operator["default"].rank == 10
    assert isinstance(adapted["model.layers.0.mlp.down_proj"].mora_dropout["default"], torch.nn.Dropout)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_llama_merges_like_lora(kind, tmp_path, llama_dir):
    """A LLaMA loaded by transformers in 4-bit or 8-bit (bitsandbytes, on the CPU): MoRA wraps its quantized layers,
    trains, saves and loads exactly, and merges into them as PEFT's LoRA does, each merged weight one rounding of
    W0 + ΔW on the quantization grid, and unmerge undoes it."""
    from quantized import dequantized, rounding, within_rounding
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if kind == "nf4"
        else BitsAndBytesConfig(load_in_8bit=True)
    )

    def quantized_base():
        return AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=quantization, device_map="cpu")

    ids = input_ids()
    for config in (MoraConfig(r=8, target_modules="all-linear", init_weights=False),
                   LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)):
        model = get_peft_model(quantized_base(), config)
        layers = {n: m for n, m in model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "merge")}
        assert layers and all(m.quantization_backend is not None or not isinstance(config, MoraConfig)
                              for m in layers.values())
        name = type(config).__name__
        model.eval()
        with torch.no_grad():  # inference first: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights for its kernel
            model(input_ids=ids)
        repacked = any(getattr(getattr(m.get_base_layer().weight, "quant_state", None), "packing_format_for_cpu", 0)
                       for m in layers.values())
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()  # trains on the quantized base
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), name
        model.eval()
        with torch.no_grad():
            unmerged = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / name)
        loaded = PeftModel.from_pretrained(quantized_base(), tmp_path / name).eval()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, unmerged), name
        if repacked and not isinstance(config, MoraConfig):
            continue  # PEFT 0.21's LoRA dequantizes a repacked weight as if it were not: its merge is wrong there
        before = {n: dequantized(m.get_base_layer()) for n, m in layers.items()}
        deltas = {n: m.get_delta_weight("default").float() for n, m in layers.items()}
        model.merge_adapter()
        for n, m in layers.items():
            exact = before[n] + deltas[n]
            assert (deltas[n].abs() > rounding(exact, kind)).any(), f"{name} {n}: ΔW lost in the grid"
            within_rounding(dequantized(m.get_base_layer()), exact, rounding(exact, kind))
        model.unmerge_adapter()
        for n, m in layers.items():
            bound = rounding(before[n] + deltas[n], kind) + rounding(dequantized(m.get_base_layer()), kind)
            within_rounding(dequantized(m.get_base_layer()), before[n], bound)
