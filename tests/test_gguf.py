"""GGUF in (a .gguf file as the base model of every command) and GGUF out (``moraft export-lora --format gguf``, the
LoRA adapter llama.cpp applies with --lora).

The GGUF base of these tests is a tiny LLaMA written here with gguf's GGUFWriter, as llama.cpp's convert_hf_to_gguf.py
lays it out (q/k rows interleaved per head, byte-level BPE vocabulary): transformers must read it back to the very
model it came from. With ``MORAFT_LLAMA_CPP`` naming a llama.cpp checkout, the export is compared with what its own
convert_lora_to_gguf.py writes from the PEFT export of the same adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import run_cli
from peft import PeftModel
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from moraft import MoraConfig
from moraft.errors import UserError
from moraft.interop import export_lora
from moraft.interop.gguf_export import rope_interleave
from moraft.models import check_gguf, load_causal_lm
from moraft.serve.server import load_base as serve_base
from moraft.testing import input_ids, logits, save_adapter, save_base, tiny_gpt2, tiny_llama
from moraft.train.builtin import CHAT_TEMPLATE, SPECIAL_TOKENS

BYTES = list(bytes_to_unicode().values())  # the byte-level alphabet, one token per byte
VOCAB = [*SPECIAL_TOKENS, *BYTES, "Ġt", "he"]
MERGES = ["Ġ t", "h e"]
KV_HEADS = 2  # grouped-query attention: q and k are interleaved with different head counts


def tiny_gguf_model(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(seed, vocab_size=len(VOCAB), num_key_value_heads=KV_HEADS)


def write_tiny_gguf(path: Path, model, qtype=gguf.GGMLQuantizationType.F32, architecture: str = "llama") -> Path:
    """``model`` (a tiny LLaMA) as a GGUF model file: llama.cpp's tensor names and layout, the metadata transformers'
    GGUF loader reads, a byte-level BPE tokenizer with the built-in chat template. 2-D weights are ``qtype``."""
    config = model.config
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(VOCAB)
    control, normal = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS), [gguf.TokenType.NORMAL] * len(BYTES + MERGES)
    writer.add_token_types(control + normal)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name.endswith("q_proj.weight"):
            tensor = rope_interleave(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = rope_interleave(tensor, config.num_key_value_heads)
        values = tensor.float().numpy()
        if values.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), gguf.quants.quantize(values, qtype),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_gguf_model())


# -- GGUF in ------------------------------------------------------------------------------------------------------


def test_gguf_base_loads_as_the_model_it_came_from(tiny_gguf, tmp_path):
    model, tokenizer = load_causal_lm(tiny_gguf)
    assert model.name_or_path == str(tiny_gguf.absolute()) and model.hf_quantizer is None
    assert not hasattr(model.config, "quantization_config")
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    ids = input_ids(vocab_size=len(VOCAB))
    torch.testing.assert_close(logits(model, ids), logits(tiny_gguf_model(), ids))  # the q/k interleave undone
    text = "the theme"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == "</s>"
    served, _ = serve_base(str(tiny_gguf), "cpu")  # moraft serve --base FILE.gguf
    torch.testing.assert_close(logits(served, ids), logits(model, ids))
    # a quantized file: dequantized, close to the original
    q8 = write_tiny_gguf(tmp_path / "q8.gguf", tiny_gguf_model(), gguf.GGMLQuantizationType.Q8_0)
    assert "Q8_0" in check_gguf(q8).tensor_types
    quantized, _ = load_causal_lm(q8, dtype=torch.bfloat16)
    assert quantized.dtype == torch.bfloat16
    torch.testing.assert_close(logits(quantized, ids), logits(model, ids), atol=0.1, rtol=0.1)


def test_gguf_files_transformers_cannot_load_are_refused_in_one_line(tiny_gguf, tmp_path, capsys):
    bert = write_tiny_gguf(tmp_path / "bert.gguf", tiny_gguf_model(), architecture="bert")
    with pytest.raises(UserError, match=r"GGUF architecture 'bert' is not one .* supported: .*llama.*qwen2"):
        check_gguf(bert)
    odd = gguf.GGUFWriter(tmp_path / "q8k.gguf", "llama")
    odd.add_tensor("token_embd.weight", np.zeros((2, 292), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_K)
    for step in (odd.write_header_to_file, odd.write_kv_data_to_file, odd.write_tensors_to_file, odd.close):
        step()
    with pytest.raises(UserError, match=r"tensor token_embd.weight is Q8_K, .* supported: F32, F16, BF16, .*Q4_K"):
        check_gguf(tmp_path / "q8k.gguf")
    garbage = tmp_path / "model.bin"
    garbage.write_bytes(b"not a model")
    status, _, err = run_cli(["merge", str(garbage), str(tmp_path), str(tmp_path / "out")], capsys)
    assert status == 2 and "is a file but not a GGUF file" in err and "Traceback" not in err


def test_train_eval_export_merge_on_a_gguf_base(tiny_gguf, tmp_path, capsys):
    """Every command takes the .gguf file as its base, and finds it again from the adapter alone."""
    run = tmp_path / "run"
    flags = ["--data.num_pairs=8", "--optimization.batch_size=4", "--optimization.max_steps=2",
             "--output.logging_steps=1", "--output.save_steps=0", "--output.dir", str(run)]
    status, _, err = run_cli(["train", "--model.name_or_path", str(tiny_gguf), *flags], capsys)
    assert status == 0, err
    adapter = next(path.parent for path in run.rglob("adapter_config.json"))
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_gguf.absolute())

    status, out, err = run_cli(["eval", str(adapter), "--num_pairs=4"], capsys)  # the base from the adapter
    assert status == 0 and str(tiny_gguf) in out + err, err
    status, _, err = run_cli(["export-lora", str(adapter), str(tmp_path / "a.gguf"), "--format", "gguf"], capsys)
    assert status == 0, err
    assert {t.name for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors} >= {"blk.0.attn_q.weight.lora_a"}

    status, _, err = run_cli(["merge", str(tiny_gguf), str(adapter), str(tmp_path / "merged")], capsys)
    assert status == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base, _ = load_causal_lm(tiny_gguf)
    expected = PeftModel.from_pretrained(base, adapter)
    ids = input_ids(vocab_size=len(VOCAB))
    torch.testing.assert_close(logits(merged, ids), logits(expected, ids), atol=1e-4, rtol=1e-4)


# -- GGUF out -----------------------------------------------------------------------------------------------------


def exported_delta(peft_model, module: str) -> torch.Tensor:
    layer = peft_model.get_submodule(f"base_model.model.{module}")
    return layer.get_delta_weight("default").float()


@pytest.mark.parametrize(
    "mora, rank",
    [(dict(r=8, compression="sharing"), None), (dict(r=8, compression="rotation"), 8)],
    ids=["sharing_exact", "rotation_svd"],
)
def test_gguf_export_reads_back(mora, rank, tmp_path, capsys):
    base_dir = save_base(tiny_gguf_model(), tmp_path / "base")
    peft_model = save_adapter(tiny_gguf_model(), MoraConfig(**mora, target_modules="all-linear"), tmp_path / "adapter")
    for dtype, qtype in (("float32", "F32"), ("float16", "F16")):
        out = tmp_path / f"{dtype}.gguf"
        result = export_lora(tmp_path / "adapter", out, rank=rank, base=base_dir, dtype=dtype, format="gguf")
        reader = gguf.GGUFReader(out)
        field = lambda key: reader.get_field(key).contents()  # noqa: E731
        keys = (field("general.architecture"), field("general.type"), field("adapter.type"))
        assert keys == ("llama", "adapter", "lora")
        assert field("adapter.lora.alpha") == result.rank  # scaling 1
        tensors = {t.name: t for t in reader.tensors}
        assert len(tensors) == 2 * 7 * 2 and {t.tensor_type.name for t in reader.tensors} == {qtype}
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        for module, error in result.errors.items():
            name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
            a_t, b_t = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
            a = torch.from_numpy(np.array(a_t.data, dtype=np.float32))
            b = torch.from_numpy(np.array(b_t.data, dtype=np.float32))
            delta = exported_delta(peft_model, module)
            assert a.shape == (result.rank, delta.shape[1]) and b.shape == (delta.shape[0], result.rank)
            assert list(a_t.shape) == [delta.shape[1], result.rank]  # GGUF lists the innermost dimension first
            if module.endswith("q_proj"):
                delta = rope_interleave(delta, 4)
            elif module.endswith("k_proj"):
                delta = rope_interleave(delta, KV_HEADS)
            found = ((b.double() @ a.double()) - delta.double()).norm() / delta.double().norm()
            tolerance = 1e-5 if dtype == "float32" else 2e-3
            assert abs(found.item() - error) < tolerance, (module, found.item(), error)
        if rank is not None:
            assert min(result.errors.values()) > 0.01  # a full-rank ΔW truncated: the error is reported, not zero
            assert "relative Frobenius error" in capsys.readouterr().out


def test_gguf_export_refusals(tmp_path, llama_dir, gpt2_dir):
    save_adapter(tiny_gpt2(), MoraConfig(r=8, target_modules=["c_attn"]), tmp_path / "gpt2")
    with pytest.raises(UserError, match=r"the base model is 'gpt2'; a GGUF LoRA adapter is written for llama"):
        export_lora(tmp_path / "gpt2", tmp_path / "out.gguf", base=gpt2_dir, format="gguf")
    save_adapter(tiny_llama(), MoraConfig(r=8, target_modules=["q_proj"]), tmp_path / "llama")
    with pytest.raises(UserError, match=r"out_dir should be a file name ending in .gguf"):
        export_lora(tmp_path / "llama", tmp_path / "out_dir", base=llama_dir, format="gguf")
    (tmp_path / "taken.gguf").write_text("mine")
    with pytest.raises(UserError, match=r"taken.gguf exists; pass --overwrite"):
        export_lora(tmp_path / "llama", tmp_path / "taken.gguf", base=llama_dir, format="gguf")
    with pytest.raises(UserError, match=r"taken.gguf exists and is not a GGUF adapter file"):
        export_lora(tmp_path / "llama", tmp_path / "taken.gguf", base=llama_dir, format="gguf", overwrite=True)
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    export_lora(tmp_path / "llama", tmp_path / "ok.gguf", base=llama_dir, format="gguf")
    export_lora(tmp_path / "llama", tmp_path / "ok.gguf", base=llama_dir, format="gguf", overwrite=True)


# -- against llama.cpp's own converter -----------------------------------------------------------------------------

LLAMA_CPP = os.environ.get("MORAFT_LLAMA_CPP")
BASES = {
    "llama": lambda: tiny_gguf_model(),
    "mistral": lambda: MistralForCausalLM(MistralConfig(
        vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=KV_HEADS)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=KV_HEADS)),
}


def compare_with_llama_cpp(llama_cpp: Path, adapter: Path, base: Path, dtype: str, out: Path, rank=None) -> float:
    """Export ``adapter`` as GGUF, and as PEFT then through llama.cpp's convert_lora_to_gguf.py; assert every key
    and tensor name, type and shape equal, and return the largest difference of the tensors' values."""
    ours = export_lora(adapter, out / "ours.gguf", rank=rank, base=base, dtype=dtype, format="gguf")
    peft_dir = out / "peft" / adapter.name  # the same name: general.name comes from the directory's
    export_lora(adapter, peft_dir, rank=rank, base=base, dtype=dtype)
    if (adapter / "README.md").is_file():  # the model card, read by gguf's Metadata in both
        shutil.copy(adapter / "README.md", peft_dir / "README.md")
    outtype = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype]
    subprocess.run(
        [sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(base), "--outtype", outtype,
         "--outfile", str(out / "reference.gguf"), str(peft_dir)],
        check=True, capture_output=True,
    )
    mine, theirs = gguf.GGUFReader(ours.path), gguf.GGUFReader(out / "reference.gguf")
    assert {k: f.contents() for k, f in mine.fields.items()} == {k: f.contents() for k, f in theirs.fields.items()}
    expected = {t.name: t for t in theirs.tensors}
    assert sorted(expected) == sorted(t.name for t in mine.tensors)
    worst = 0.0
    for tensor in mine.tensors:
        other = expected[tensor.name]
        assert (tensor.tensor_type, list(tensor.shape)) == (other.tensor_type, list(other.shape)), tensor.name
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
        worst = max(worst, float(np.abs(values - gguf.quants.dequantize(other.data, other.tensor_type)).max()))
    return worst


@pytest.mark.skipif(not LLAMA_CPP, reason="MORAFT_LLAMA_CPP does not name a llama.cpp checkout (with its "
                    "convert_lora_to_gguf.py and gguf-py) to compare the GGUF export with")
@pytest.mark.parametrize("arch", list(BASES))
def test_gguf_export_equals_llama_cpp_convert_lora_to_gguf(arch, tmp_path):
    base = BASES[arch]()
    base_dir = save_base(base, tmp_path / "base")
    save_adapter(BASES[arch](), MoraConfig(r=8, target_modules="all-linear"), tmp_path / "adapter")
    save_adapter(BASES[arch](), MoraConfig(r=8, compression="rotation", target_modules="all-linear"),
                 tmp_path / "rotation")
    for dtype in ("float32", "float16", "bfloat16"):
        out = tmp_path / dtype
        assert compare_with_llama_cpp(Path(LLAMA_CPP), tmp_path / "adapter", base_dir, dtype, out) == 0.0
    assert compare_with_llama_cpp(Path(LLAMA_CPP), tmp_path / "rotation", base_dir, "float32", tmp_path / "r", 8) == 0.0


# -- the real model ------------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_gguf_base_trains_and_exports_for_llama_cpp(tmp_path, capsys):
    """SmolLM2-135M-Instruct's own Q4_1 GGUF file as --model: 2 training steps, then the adapter (which records the
    file as its base) exported as a GGUF LoRA adapter for that file."""
    from moraft.models import smollm2_gguf

    base = smollm2_gguf()
    run = tmp_path / "run"
    flags = ["--data.num_pairs=4", "--data.seq_length=64", "--optimization.batch_size=2",
             "--optimization.max_steps=2", "--output.save_steps=0", "--output.dir", str(run)]
    status, _, err = run_cli(["train", "--model", str(base), *flags], capsys)
    assert status == 0, err
    adapter = next(path.parent for path in run.rglob("adapter_config.json"))
    status, _, err = run_cli(["export-lora", str(adapter), str(tmp_path / "a.gguf"), "--format", "gguf"], capsys)
    assert status == 0, err
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert reader.get_field("general.architecture").contents() == "llama"
    names = {t.name for t in reader.tensors}
    assert {f"blk.{i}.attn_q.weight.lora_b" for i in range(30)} <= names
