"""Converting checkpoints written by the MoRA authors' peft-mora: the fixture's numbers, ReMoRA's types, the errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import FIXTURE, fixture_base, fixture_expected, leftovers
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moraft
from moraft.cli import main
from moraft.errors import UserError
from moraft.interop import convert_peft_mora, export_lora, merge_adapter
from moraft.testing import input_ids, logits, save_adapter, tiny_llama

TOL = 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("converted")
    return {t: convert_peft_mora(FIXTURE / f"adapter_type{t}", out / f"type{t}", base=FIXTURE / "base") for t in (1, 6)}


# ----------------------------------------------------------------------------------------------------------------
# the fixture: numbers produced by peft-mora itself


@pytest.mark.parametrize("mora_type", [1, 6])
def test_fixture_logits_deltas_and_merge_match_peft_mora(converted, mora_type):
    expected = fixture_expected()
    ids = expected["input_ids"]
    config = json.loads((converted[mora_type] / "adapter_config.json").read_text())
    assert config["peft_type"] == "MORA" and config["peft_mora_compat"] is True
    assert config["compression"] == {1: "sharing", 6: "rotation"}[mora_type]

    model = PeftModel.from_pretrained(fixture_base(), converted[mora_type]).eval()
    torch.testing.assert_close(logits(model, ids), expected[f"type{mora_type}_logits"], atol=TOL, rtol=0)

    deltas = model.base_model.delta_weights()
    want = {k.split(".", 1)[1]: v for k, v in expected.items() if k.startswith(f"type{mora_type}_delta.")}
    assert sorted(deltas) == sorted(want) and len(want) == 14
    for name, delta in want.items():
        torch.testing.assert_close(deltas[name], delta, atol=TOL, rtol=0, msg=name)

    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), expected[f"type{mora_type}_merged_logits"], atol=TOL, rtol=0)


def test_fixture_rotation_keeps_peft_mora_truncation_for_down_proj(converted):
    """down_proj (216 -> 80, r̂=48): peft-mora drops the block outputs past 80, so inputs past the first two blocks
    (96 features) do not affect ΔW. The converted adapter must keep that."""
    model = PeftModel.from_pretrained(fixture_base(), converted[6])
    delta = model.base_model.delta_weights()["model.layers.0.mlp.down_proj"]
    assert delta.shape == (80, 216)
    assert delta[:, 96:].abs().max() == 0 and delta[:, :96].abs().max() > 0


@pytest.mark.parametrize("mora_type", [1, 6])
def test_moraft_merge_of_converted_fixture_matches_peft_mora_merge(converted, mora_type, tmp_path):
    merged_dir = merge_adapter(FIXTURE / "base", converted[mora_type], tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    expected = fixture_expected()
    torch.testing.assert_close(
        logits(model, expected["input_ids"]), expected[f"type{mora_type}_merged_logits"], atol=TOL, rtol=0
    )


def test_converted_sharing_exports_as_lora_with_peft_mora_logits(converted, tmp_path):
    """Type 1 is a rank-r̂ LoRA: converted, then exported, plain PEFT LoRA gives peft-mora's own logits."""
    result = export_lora(converted[1], tmp_path / "lora", base=FIXTURE / "base")
    assert result.rank == 49  # r̂ of the 80<->216 MLP layers; the 80x80 ones (36) are zero-padded
    model = PeftModel.from_pretrained(fixture_base(), result.path).eval()
    expected = fixture_expected()
    torch.testing.assert_close(logits(model, expected["input_ids"]), expected["type1_logits"], atol=TOL, rtol=0)


def test_cli_converts_without_base_and_gives_the_same_adapter(converted, tmp_path, capsys):
    main(["convert-peft-mora", str(FIXTURE / "adapter_type6"), str(tmp_path / "cli")])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "cli" / name).read_bytes() == (converted[6] / name).read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# ReMoRA's types 2, 3, 4 (and 1) against an independent reference written from peft-mora's formulas


def fork_groups(n: int, r: int, contiguous: bool, wrap: bool) -> torch.Tensor:
    """(r, n) 0/1 matrix: entry [g, p] counts how often feature p is in group g, as peft-mora builds it.

    strided (types 1/4 input, 1/3 output): feature p is in group p mod r; the input side first pads the features by
    wrapping its own first ones to a multiple of r. contiguous (types 2/3 input, 2/4 output): n mod r groups of
    n//r + 1 consecutive features, then groups of n//r (repeat_interleave)."""
    groups = torch.zeros(r, n)
    if not contiguous:
        for p in range(-(-n // r) * r if wrap else n):
            groups[p % r, p % n] += 1
        return groups
    small = n // r
    sizes = [small + 1] * (n - r * small) + [small] * (r - (n - r * small))
    start = 0
    for g, size in enumerate(sizes):
        groups[g, start : start + size] = 1
        start += size
    return groups


def fork_delta(m: torch.Tensor, k: int, d: int, mora_type: int) -> torch.Tensor:
    r = m.shape[0]
    c = fork_groups(k, r, contiguous=mora_type in (2, 3), wrap=True)  # (r̂, k)
    dmat = fork_groups(d, r, contiguous=mora_type in (2, 4), wrap=False).T  # (d, r̂)
    return dmat @ m @ c


def write_fork_adapter(path: Path, model, mora_type: int, r: int, rank_pattern: dict | None = None, seed: int = 0):
    """A directory laid out as peft-mora saves a MoRA adapter (random M, lora_B a copy of lora_A)."""
    path.mkdir(parents=True)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    gen = torch.Generator().manual_seed(seed)
    tensors, shapes = {}, {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            k, d = module.in_features, module.out_features
            key = next((key for key in (rank_pattern or {}) if re.match(rf".*\.{key}$", name)), None)
            r_mod = rank_pattern[key] if key else r
            rank = int(math.sqrt((k + d) * r_mod) + 0.5)  # peft-mora's r̂
            m = torch.randn(rank, rank, generator=gen) * 0.05
            tensors[f"base_model.model.{name}.lora_A.weight"] = m
            tensors[f"base_model.model.{name}.lora_B.weight"] = m.clone()
            shapes[name] = (k, d)
    config = {
        "peft_type": "LORA",
        "use_mora": True,
        "mora_type": mora_type,
        "r": r,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "rank_pattern": rank_pattern or {},
        "target_modules": targets,
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors")
    return tensors, shapes


@pytest.mark.parametrize(
    "mora_type, rank_pattern",
    [(1, None), (2, None), (3, {"down_proj": 2}), (4, None)],
)
def test_remora_types_match_reference(tmp_path, mora_type, rank_pattern):
    # widths 40 and 100 with r=4 give r̂ = 18 and 24 (17 for down_proj at r=2): none divides, so every padding and
    # uneven-group path runs
    base = tiny_llama(hidden_size=40, intermediate_size=100)
    base.save_pretrained(tmp_path / "base")
    tensors, shapes = write_fork_adapter(tmp_path / "fork", base, mora_type, r=4, rank_pattern=rank_pattern)
    out = convert_peft_mora(tmp_path / "fork", tmp_path / "moraft", base=tmp_path / "base")

    reference = tiny_llama(hidden_size=40, intermediate_size=100)
    want = {}
    for name, (k, d) in shapes.items():
        want[name] = fork_delta(tensors[f"base_model.model.{name}.lora_A.weight"], k, d, mora_type)
        reference.get_submodule(name).weight.data += want[name]

    model = PeftModel.from_pretrained(tiny_llama(hidden_size=40, intermediate_size=100), out).eval()
    deltas = model.base_model.delta_weights()
    assert sorted(deltas) == sorted(want)
    for name in want:
        torch.testing.assert_close(deltas[name], want[name], atol=1e-6, rtol=0, msg=name)
    ids = input_ids()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# errors


def test_not_a_peft_mora_adapter_names_the_file(tmp_path):
    save_adapter(tiny_llama(), moraft.MoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "moraft_adapter")
    with pytest.raises(UserError, match=r"moraft_adapter/adapter_config\.json: not a peft-mora adapter.*MORA"):
        convert_peft_mora(tmp_path / "moraft_adapter", tmp_path / "out")
    with pytest.raises(UserError, match=r"nowhere is not a directory"):
        convert_peft_mora(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty/adapter_config\.json not found"):
        convert_peft_mora(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _fork_copy(tmp_path: Path, mora_type: int = 1) -> Path:
    src = tmp_path / "fork"
    src.mkdir()
    config = json.loads((FIXTURE / f"adapter_type{mora_type}" / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(FIXTURE / f"adapter_type{mora_type}" / "adapter_model.safetensors")
    save_file(weights, src / "adapter_model.safetensors")
    return src


def test_bad_mora_type_and_tensors_are_named(tmp_path):
    src = _fork_copy(tmp_path)
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "mora_type": 5}))
    with pytest.raises(UserError, match=r"adapter_config\.json: mora_type=5 .*accepted: 1, 2, 3, 4, 6"):
        convert_peft_mora(src, tmp_path / "out")
    (src / "adapter_config.json").write_text(json.dumps(config))

    tensors = load_file(src / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key] + 1
    save_file(tensors, src / "adapter_model.safetensors")
    with pytest.raises(
        UserError,
        match=r"fork/adapter_model\.safetensors: module model\.layers\.1\.self_attn\.v_proj: lora_B\.weight "
        r"\(shape \(36, 36\)\) differs from lora_A\.weight",
    ):
        convert_peft_mora(src, tmp_path / "out")

    tensors[key] = torch.zeros(36, 80)
    tensors[key.replace("lora_B", "lora_A")] = torch.zeros(36, 80)
    save_file(tensors, src / "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"v_proj: lora_A\.weight has shape \(36, 80\); peft-mora stores .*square"):
        convert_peft_mora(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_base_with_other_shapes_is_an_error_at_conversion_and_at_load(tmp_path):
    other = tiny_llama()
    other.save_pretrained(tmp_path / "other_base")
    with pytest.raises(
        UserError,
        match=r"adapter_type6/adapter_model\.safetensors: module model\.layers\.0\.mlp\.down_proj: M is 48x48, but "
        r"peft-mora \(mora_type=6, r=8\) gives the 64x128 layer of .*other_base an M of 38x38",
    ):
        convert_peft_mora(FIXTURE / "adapter_type6", tmp_path / "out", base=tmp_path / "other_base")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    # without a base the conversion succeeds; loading onto the wrong base fails, naming module and shapes
    out = convert_peft_mora(FIXTURE / "adapter_type6", tmp_path / "out")
    with pytest.raises(ValueError, match=r"q_proj: .* 36x36 M, but peft-mora gives this 64x64 layer \(r=8\) a 32x32 M"):
        PeftModel.from_pretrained(other, out)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    convert_peft_mora(FIXTURE / "adapter_type1", out)  # an earlier conversion
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(UserError, match=r"out already exists.*--overwrite"):
        convert_peft_mora(FIXTURE / "adapter_type1", out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    convert_peft_mora(FIXTURE / "adapter_type1", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert leftovers(tmp_path) == []
    (out / "keep.txt").write_text("mine")  # not the command's to replace, even with overwrite
    with pytest.raises(UserError, match=r"holds entries that moraft convert-peft-mora did not write \(keep.txt\)"):
        convert_peft_mora(FIXTURE / "adapter_type1", out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-peft-mora", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing is not a directory" in err
