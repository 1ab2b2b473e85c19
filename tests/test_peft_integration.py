"""MoRA inside real PEFT and real transformers models (tiny, built from a config: no downloads)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import moraft
from moraft import COMPRESSIONS, MoraConfig, MoraLayer

LLAMA = LlamaConfig(
    hidden_size=80,
    intermediate_size=216,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=64,
    max_position_embeddings=64,
)
GPT2 = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}


def base_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LLAMA) if arch == "llama" else GPT2LMHeadModel(GPT2)
    return model.eval()


def batch(seed: int = 1, rows: int = 3, length: int = 12):
    torch.manual_seed(seed)
    return torch.randint(0, 64, (rows, length))


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_end_to_end_train_save_load_merge(arch, compression, tmp_path):
    model = get_peft_model(base_model(arch), MoraConfig(r=8, compression=compression, target_modules=TARGETS[arch]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "mora_M" not in n}
    ids = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        if "mora_M" in n:
            assert p.requires_grad and p.abs().sum() > 0, n
        else:
            assert torch.equal(p, frozen[n]), f"{n} changed"

    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(arch), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged = loaded.merge_and_unload()
        assert not any(isinstance(m, MoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_print_trainable_parameters_matches_lora_budget(capsys):
    """At r=8 every MoRA layer has r̂² ≈ (d + k)·8 parameters: LoRA r=8's budget, to rounding."""
    from peft import LoraConfig

    mora = get_peft_model(base_model("llama"), MoraConfig(r=8, target_modules="all-linear"))
    lora = get_peft_model(base_model("llama"), LoraConfig(r=8, target_modules="all-linear"))
    mora.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out
    n_mora = mora.get_nb_trainable_parameters()[0]
    n_lora = lora.get_nb_trainable_parameters()[0]
    assert abs(n_mora - n_lora) / n_lora < 0.02


def test_several_named_adapters(tmp_path):
    model = get_peft_model(
        base_model("llama"), MoraConfig(r=8, compression="sharing", target_modules="all-linear", init_weights=False)
    )
    model.add_adapter("rot", MoraConfig(r=4, compression="rotation", target_modules=["q_proj", "v_proj"], init_weights=False))
    ids = batch()
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
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path)
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
    model = get_peft_model(base_model("llama"), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head" in n for n in trainable) and any("mora_M" in n for n in trainable)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
        expected = model(batch()).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch()).logits, expected)


@pytest.fixture
def two_adapter_model():
    model = get_peft_model(
        base_model("llama"), MoraConfig(r=8, compression="sharing", target_modules="all-linear", init_weights=False),
        adapter_name="one",
    )
    torch.manual_seed(5)
    model.add_adapter("two", MoraConfig(r=8, compression="rotation", target_modules="all-linear", init_weights=False))
    return model.eval()


def test_mixed_adapter_batch_forward(two_adapter_model):
    model = two_adapter_model
    ids = batch(rows=4)
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
    ids = batch(rows=3, length=6)
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
    from peft import LoraConfig

    lora = get_peft_model(base_model("llama"), LoraConfig(r=4, target_modules="all-linear"), adapter_name="one")
    lora.add_adapter("two", LoraConfig(r=4, target_modules="all-linear"))
    lora.eval()
    mora = two_adapter_model
    ids = batch(rows=2)
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


def test_conv1d_and_linear_deltas_are_laid_out_like_their_weights():
    model = get_peft_model(base_model("gpt2"), MoraConfig(r=8, target_modules=["c_attn"], init_weights=False))
    deltas = model.base_model.delta_weights()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert deltas["transformer.h.0.attn.c_attn"].shape == (layer.out_features, layer.in_features)
    assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape


def test_warns_when_full_training_is_cheaper():
    with pytest.warns(UserWarning, match="at least as many as the full"):
        get_peft_model(base_model("llama"), MoraConfig(r=64, target_modules=["q_proj"]))


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
    model = get_peft_model(base_model("llama"), config)
    adapted = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, MoraLayer)}
    assert set(adapted) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    assert adapted["model.layers.0.self_attn.q_proj"].mora_operator["default"].rank == 18  # sqrt(160 * 2) = 17.9
    assert adapted["model.layers.0.mlp.down_proj"].mora_operator["default"].rank == 10
    assert isinstance(adapted["model.layers.0.mlp.down_proj"].mora_dropout["default"], torch.nn.Dropout)


def test_fp16_base_merges_in_fp32():
    model = base_model("llama").half()
    model = get_peft_model(model, MoraConfig(r=8, compression="sharing", target_modules=["up_proj"], init_weights=False))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert layer.mora_M["default"].dtype == torch.float32
    expected = (layer.get_base_layer().weight.float() + layer.get_delta_weight("default")).half()
    model.merge_adapter()
    assert torch.equal(layer.get_base_layer().weight, expected)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_llama_merges_like_lora(kind, tmp_path):
    """A LLaMA loaded by transformers in 4-bit or 8-bit (bitsandbytes, on the CPU): MoRA wraps its quantized layers,
    trains, saves and loads exactly, and merges into them as PEFT's LoRA does, each merged weight one rounding of
    W0 + ΔW on the quantization grid, and unmerge undoes it."""
    from interop_helpers import input_ids, tiny_llama
    from peft import LoraConfig
    from quantized import dequantized, rounding, within_rounding
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "base")
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if kind == "nf4"
        else BitsAndBytesConfig(load_in_8bit=True)
    )

    def quantized_base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")

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
