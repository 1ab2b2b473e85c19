"""`moraft merge`: merged checkpoints that plain transformers loads, matching the adapter model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import leftovers
from peft import KasaConfig, LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from moraft import MoraConfig
from moraft.cli import main
from moraft.errors import UserError
from moraft.interop import merge_adapter
from moraft.interop.merge import TensorSpec, write_safetensors
from moraft.testing import char_tokenizer, input_ids, logits, randomize_adapter, save_adapter, tiny_llama


def _adapter(name: str, model):
    """The adapter rows, as their configs initialise them."""
    everywhere = dict(r=8, target_modules="all-linear")
    if name == "mora_rotation":
        return get_peft_model(model, MoraConfig(compression="rotation", **everywhere))
    if name == "mora_sharing_gpt2":
        return get_peft_model(model, MoraConfig(compression="sharing", **everywhere))
    if name == "mora_modules_to_save":
        config = MoraConfig(r=4, compression="rotation", target_modules=["q_proj"], modules_to_save=["lm_head"])
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(-2)
        return peft_model
    if name == "lora":
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
            use_rslora=True,
        )
        return get_peft_model(model, config)
    variants = {  # LoRA variants whose ΔW is not scaling·B·A: merged by PEFT's own layer code
        "dora": dict(use_dora=True),
        "kasa": dict(kasa_config=KasaConfig()),  # ΔW = B·diag·A, and the base weight loses its r smallest singular values
    }
    if name in variants:
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], **variants[name])
        return get_peft_model(model, config)
    raise KeyError(name)


def adapted(name: str, base_dir: Path, **load):
    """The row's adapter on the base in ``base_dir``, random and non-zero, so a merge cannot pass by doing nothing."""
    return randomize_adapter(_adapter(name, AutoModelForCausalLM.from_pretrained(base_dir, **load)))


@pytest.mark.parametrize("name", ["mora_rotation", "mora_sharing_gpt2", "mora_modules_to_save", "lora", "dora", "kasa"])
def test_merged_model_matches_adapter_model(tmp_path, name, llama_dir, gpt2_dir):
    base = gpt2_dir if "gpt2" in name else llama_dir
    model = adapted(name, base).eval()
    model.save_pretrained(tmp_path / "adapter")
    merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = input_ids()
    want = logits(model, ids)
    assert (want - logits(AutoModelForCausalLM.from_pretrained(base), ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-5, rtol=0)
    assert leftovers(tmp_path) == []


def test_sharded_base_to_sharded_output_with_side_files(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    char_tokenizer().save_pretrained(tmp_path / "base")
    GenerationConfig(max_new_tokens=7).save_pretrained(tmp_path / "base")
    model = adapted("mora_rotation", tmp_path / "base").eval()
    model.save_pretrained(tmp_path / "adapter")

    main(["merge", *(str(tmp_path / p) for p in ("base", "adapter", "merged")), "--max_shard_size=150KB"])
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            keys = list(f.keys())
        assert (out / shard).stat().st_size <= 150_000 or len(keys) == 1
        assert all(index["weight_map"][k] == shard for k in keys)
    assert sorted(index["weight_map"]) == sorted(base.state_dict())

    assert AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == char_tokenizer()("ab")["input_ids"]
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged, input_ids()), logits(model, input_ids()), atol=1e-5, rtol=0)


def test_bf16_stays_bf16_and_delta_is_added_in_fp32(tmp_path):
    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = adapted("mora_rotation", tmp_path / "base", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "adapter")
    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")

    before = load_file(tmp_path / "base" / "model.safetensors")
    after = load_file(tmp_path / "merged" / "model.safetensors")
    assert sorted(after) == sorted(before) and all(t.dtype == torch.bfloat16 for t in after.values())
    deltas = model.base_model.delta_weights()
    for name, tensor in before.items():
        module = name.removesuffix(".weight")
        want = (tensor.float() + deltas[module]).to(torch.bfloat16) if module in deltas else tensor
        assert torch.equal(after[name], want), name
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16

    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged32", dtype="float32")
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "merged32" / "model.safetensors").values())
    assert json.loads((tmp_path / "merged32" / "config.json").read_text())["dtype"] == "float32"


def test_streaming_writer_matches_safetensors(tmp_path):
    tensors = {
        "b.bf16": torch.randn(3, 5).to(torch.bfloat16),  # odd byte counts before wider types
        "a.f32": torch.randn(7),
        "c.i64": torch.arange(3),
        "d.bool": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
        "g.f16": torch.randn(1, 3).half(),
    }
    specs = [TensorSpec(k, tuple(v.shape), v.dtype, Path(), k) for k, v in tensors.items()]
    write_safetensors(tmp_path / "x.safetensors", specs, lambda s: tensors[s.name], {"format": "pt"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert sorted(loaded) == sorted(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "x.safetensors").stat().st_size == (tmp_path / "ref.safetensors").stat().st_size


def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path, llama_dir):
    other = tiny_llama(hidden_size=40, intermediate_size=100)
    save_adapter(other, MoraConfig(r=8, target_modules=["q_proj"]), tmp_path / "other")
    # trained on 40x40 layers (r̂ 25); this base has 64x64 ones (r̂ 32)
    mismatch = r"other/adapter_model\.safetensors: .*q_proj\.mora_M has shape \(25, 25\), but on this base model"
    with pytest.raises(UserError, match=mismatch + r" \(the base's layer is 64x64\)"):
        merge_adapter(llama_dir, tmp_path / "other", tmp_path / "out")
    with pytest.raises(UserError, match=r"base model \S*nowhere is neither a local directory"):
        merge_adapter(tmp_path / "nowhere", tmp_path / "other", tmp_path / "out")

    (tmp_path / "bin_base").mkdir()
    (tmp_path / "bin_base" / "config.json").write_text((llama_dir / "config.json").read_text())
    (tmp_path / "bin_base" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"no model\.safetensors .*pytorch_model\.bin: re-save"):
        merge_adapter(tmp_path / "bin_base", tmp_path / "other", tmp_path / "out")

    # aLoRA: PEFT itself refuses to merge it (its update applies only after the invocation tokens)
    alora = LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    save_adapter(tiny_llama(), alora, tmp_path / "alora")
    with pytest.raises(UserError, match=r"alora: PEFT cannot merge this LoRA variant \(alora_invocation_tokens=\[5, 6\]\): "
                       r"aLoRA does not support merging\. Nothing was written"):
        merge_adapter(llama_dir, tmp_path / "alora", tmp_path / "out")
    save_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), tmp_path / "bias")
    with pytest.raises(UserError, match=r"bias/adapter_config\.json: moraft merge cannot apply .*lora_bias=True \(a bias"):
        merge_adapter(llama_dir, tmp_path / "bias", tmp_path / "out")
    with pytest.raises(UserError, match=r"dtype='int8' is not one of auto, float32, bfloat16, float16"):
        merge_adapter(llama_dir, tmp_path / "alora", tmp_path / "out", dtype="int8")
    with pytest.raises(UserError, match=r"max_shard_size='lots' is invalid"):
        merge_adapter(llama_dir, tmp_path / "alora", tmp_path / "out", max_shard_size="lots")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine").write_text("x")
    save_adapter(tiny_llama(), MoraConfig(r=8, target_modules=["q_proj"]), tmp_path / "ok")
    with pytest.raises(UserError, match=r"already exists"):
        merge_adapter(llama_dir, tmp_path / "ok", tmp_path / "out")
    assert (tmp_path / "out" / "mine").read_text() == "x"
