"""Exporting MoRA adapters as plain LoRA adapters, checked by vanilla PEFT in a process that cannot import moraft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import leftovers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moraft import MoraConfig, MoraOperator
from moraft.cli import main
from moraft.errors import UserError
from moraft.interop import export_lora
from moraft.interop.lora_export import lora_factors
from moraft.testing import input_ids, logits, save_adapter, tiny_gpt2, tiny_llama

# name -> (model builder, MoraConfig kwargs, export rank)
EXACT = {
    "sharing": (tiny_llama, dict(r=8, compression="sharing", target_modules="all-linear"), None),
    "sharing_contiguous": (
        tiny_llama,
        dict(r=4, compression="sharing", input_grouping="contiguous", output_grouping="contiguous",
             target_modules="all-linear"),
        None,
    ),
    "truncation": (tiny_llama, dict(r=8, compression="truncation", target_modules="all-linear"), None),
    # r̂ = 64 >= every input width adapted here: one block, an exact rank-64 LoRA
    "decouple_one_block": (
        tiny_llama, dict(mora_rank=64, compression="decouple", target_modules=["q_proj", "up_proj"]), None
    ),
    "gpt2_sharing": (tiny_gpt2, dict(r=8, compression="sharing", target_modules="all-linear"), None),
    # rank 128 >= min(d, k) of every layer: the truncated SVD keeps everything
    "rotation_full": (tiny_llama, dict(r=8, compression="rotation", target_modules="all-linear"), 128),
}
APPROXIMATE = {"rotation_rank8": (tiny_llama, dict(r=8, compression="rotation", target_modules="all-linear"), 8)}

VANILLA = textwrap.dedent(
    """
    import sys
    sys.modules["moraft"] = None  # "import moraft" now raises: only vanilla PEFT may load these adapters
    import json, torch
    from peft import LoraConfig, PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    jobs = json.loads(open(sys.argv[1]).read())
    ids = torch.tensor(jobs["input_ids"])
    out = {}
    for name, job in jobs["adapters"].items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(job["base"]), job["adapter"]).eval()
        assert type(model.peft_config["default"]) is LoraConfig
        with torch.no_grad():
            out[name] = model(input_ids=ids).logits.float().contiguous()
    assert not [m for m, mod in sys.modules.items() if m.split(".")[0] == "moraft" and mod is not None]
    save_file(out, jobs["output"])
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama_dir, gpt2_dir):
    """Every row exported, MoRA reference logits computed here, LoRA logits computed by a vanilla subprocess."""
    root = tmp_path_factory.mktemp("export")
    ids = input_ids()
    rows, jobs = {}, {}
    for name, (build, kwargs, rank) in {**EXACT, **APPROXIMATE}.items():
        base_dir = {tiny_llama: llama_dir, tiny_gpt2: gpt2_dir}[build]  # the same weights as build()
        mora = save_adapter(build(), MoraConfig(**kwargs), root / f"{name}_mora")
        result = export_lora(root / f"{name}_mora", root / f"{name}_lora", rank=rank, base=base_dir)
        rows[name] = dict(result=result, mora_logits=logits(mora.eval(), ids), base=base_dir, mora=mora)
        jobs[name] = {"base": str(base_dir), "adapter": str(result.path)}
    spec = root / "jobs.json"
    output = root / "vanilla.safetensors"
    spec.write_text(json.dumps({"input_ids": ids.tolist(), "adapters": jobs, "output": str(output)}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", VANILLA, str(spec)], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    vanilla = load_file(output)
    for name in rows:
        rows[name]["lora_logits"] = vanilla[name]
    return rows


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_export_matches_mora_logits_in_vanilla_peft(exported, name):
    row = exported[name]
    assert row["mora_logits"].abs().max() > 0
    torch.testing.assert_close(row["lora_logits"], row["mora_logits"], atol=1e-5, rtol=0)
    assert max(row["result"].errors.values()) < 1e-6


@pytest.mark.parametrize("name", list(EXACT) + list(APPROXIMATE))
def test_exported_files_are_a_plain_lora_adapter(exported, name):
    row = exported[name]
    path, rank = row["result"].path, row["result"].rank
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == rank
    assert config["bias"] == "none" and not config["modules_to_save"] and not config["use_dora"]
    assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
    assert config["fan_in_fan_out"] is name.startswith("gpt2")
    tensors = load_file(path / "adapter_model.safetensors")
    adapted = {n for n, m in row["mora"].named_modules() if hasattr(m, "mora_M")}
    assert {k.rsplit(".", 2)[0] for k in tensors} == adapted
    for key, tensor in tensors.items():
        assert key.endswith((".lora_A.weight", ".lora_B.weight"))
        assert (tensor.shape[0] if "lora_A" in key else tensor.shape[1]) == rank


def test_exact_rank_is_the_largest_mora_rank(exported):
    # sharing r=8 on 64x64 attention (r̂ 32) and 64<->128 MLP (r̂ 39): one rank, 39, the smaller modules zero-padded
    result = exported["sharing"]["result"]
    assert result.rank == 39
    tensors = load_file(result.path / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a[32:].abs().max() == 0 and a[:32].abs().max() > 0


def test_truncated_svd_export_reports_its_error(exported):
    row = exported["rotation_rank8"]
    result = row["result"]
    assert result.rank == 8
    tensors = load_file(result.path / "adapter_model.safetensors")
    deltas = row["mora"].base_model.delta_weights()
    for module, delta in deltas.items():
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        error = ((delta - b @ a).norm() / delta.norm()).item()
        assert result.errors[module] == pytest.approx(error, rel=1e-3)
        # the best rank-8 approximation: the error of the truncated spectrum
        s = torch.linalg.svdvals(delta.double())
        assert error == pytest.approx(((s[8:] ** 2).sum() / (s**2).sum()).sqrt().item(), rel=1e-3)
        assert 0 < error < 1
    # vanilla PEFT loads it too and gives what PEFT gives in this process
    in_process = PeftModel.from_pretrained(tiny_llama(), result.path).eval()
    torch.testing.assert_close(row["lora_logits"], logits(in_process, input_ids()), atol=1e-5, rtol=0)


OPERATORS = [
    MoraOperator(k, d, rank, "sharing", ig, og, compat)
    for k, d, rank in [(40, 100, 18), (100, 40, 24), (30, 20, 50)]
    for ig in ("strided", "contiguous")
    for og in ("strided", "contiguous")
    for compat in (False, True)
] + [
    MoraOperator(40, 100, 18, "truncation"),
    MoraOperator(10, 20, 30, "truncation"),
    MoraOperator(40, 100, 48, "decouple"),
    MoraOperator(40, 30, 40, "decouple"),
]


@pytest.mark.parametrize("op", OPERATORS, ids=repr)
def test_lora_factors_reproduce_delta_weight(op):
    assert op.is_low_rank
    m = torch.randn(op.rank, op.rank, generator=torch.Generator().manual_seed(op.rank))
    a, b = lora_factors(op, m)
    assert a.shape == (op.rank, op.in_features) and b.shape == (op.out_features, op.rank)
    torch.testing.assert_close(b @ a, op.delta_weight(m), atol=1e-5, rtol=0)


def test_full_rank_without_rank_is_an_error_saying_why(tmp_path, llama_dir):
    for compression, kwargs in (("rotation", {}), ("decouple", {"mora_rank": 16})):
        adapter = tmp_path / compression
        config = MoraConfig(r=8, compression=compression, target_modules=["q_proj"], **kwargs)
        save_adapter(tiny_llama(), config, adapter)
        why = rf"full-rank ΔW.*compression='{compression}'.*Pass --rank N.*truncated SVD"
        with pytest.raises(UserError, match=why):
            export_lora(adapter, tmp_path / "out", base=llama_dir)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_modules_to_save_and_missing_base_are_errors(tmp_path, llama_dir):
    config = MoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    save_adapter(tiny_llama(), config, tmp_path / "with_head")
    with pytest.raises(UserError, match=r"modules_to_save=\['lm_head'\].*moraft merge"):
        export_lora(tmp_path / "with_head", tmp_path / "out", base=llama_dir)

    model = tiny_llama()
    model.name_or_path = ""
    save_adapter(model, MoraConfig(r=8, target_modules=["q_proj"]), tmp_path / "no_base")
    with pytest.raises(UserError, match=r"records none.*pass --base DIR"):
        export_lora(tmp_path / "no_base", tmp_path / "out")
    with pytest.raises(UserError, match=r"nowhere.* is neither a local directory"):
        export_lora(tmp_path / "no_base", tmp_path / "out", base=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_prints_each_module_error(tmp_path, capsys, llama_dir):
    base = AutoModelForCausalLM.from_pretrained(llama_dir)  # records where it came from
    config = MoraConfig(r=8, compression="rotation", target_modules=["q_proj", "down_proj"])
    save_adapter(base, config, tmp_path / "rot")
    main(["export-lora", str(tmp_path / "rot"), str(tmp_path / "out"), "--rank", "16"])  # base from the adapter
    lines = [line for line in capsys.readouterr().out.splitlines() if "relative Frobenius error" in line]
    assert len(lines) == 4 and all(line.split(": rank 16")[0].endswith(("q_proj", "down_proj")) for line in lines)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 16
