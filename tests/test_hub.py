"""Models, tokenizers and datasets from the Hugging Face Hub, against `moraft.testing.LocalHub` (a Hub stand-in on
loopback): every command downloads a Hub id into a fresh HF_HOME as transformers and datasets would (only the files
from_pretrained reads, at the revision asked for), then works again from the cache with HF_HUB_OFFLINE=1 and the
hub stopped; and each way of failing (gated, private, no such repo or revision, offline and not cached, network
down) is one line saying what to do.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so each phase runs in a
subprocess with its environment set, and runs all its commands there (`SCRIPT`), reporting what happened as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moraft.testing import LocalHub, save_base, tiny_llama

# One phase: run each moraft command in this process (moraft.cli.main, as `moraft ...` runs it), then try each
# failing load; print {"status": {command: exit status}, "stderr": {...}, "errors": {case: message}, ...} as JSON.
SCRIPT = r"""
import contextlib, io, json, os, sys
from pathlib import Path

tmp, phase = Path(sys.argv[1]), sys.argv[2]
from moraft.cli import main
from moraft.errors import UserError
from moraft.models import load_tokenizer, resolve_model_dir
from moraft.train.data import read_source
from moraft.train.options import DataOptions

report = {"status": {}, "stderr": {}, "errors": {}}
run = tmp / phase


def command(name, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            status = 0
        except SystemExit as exit_:
            status = exit_.code
    report["status"][name], report["stderr"][name] = status, err.getvalue().strip().splitlines()[-1:]


def error(name, call):
    try:
        call()
        report["errors"][name] = None
    except UserError as err:
        report["errors"][name] = str(err)


command("train", ["train", "--model", "org/tiny", "--model.revision", "v1", "--data", "org/text",
                  "--data.seq_length", "32", "--optimization.max_steps", "1", "--optimization.batch_size", "2",
                  "--output.save_steps", "0", "--output.dir", str(run / "run")])
command("eval", ["eval", str(run / "run"), "--num_pairs", "2", "--output", str(run / "eval.json")])
command("merge", ["merge", "org/tiny", str(run / "run"), str(run / "merged"), "--revision", "v1"])
command("export-lora", ["export-lora", str(run / "run"), str(run / "lora"), "--base", "org/tiny",
                        "--revision", "v1"])
command("data", ["data", "--corpus", str(tmp / "corpus"), "--output", str(run / "data"), "--stages", "mine",
                 "--mine.base_tokenizer", "org/tiny"])
from moraft.serve.server import load_base

model, tokenizer = load_base("org/tiny", "cpu", "float32", revision="v1")
report["serve_layers"] = model.config.num_hidden_layers
report["snapshot"] = sorted(p.name for p in resolve_model_dir("org/tiny", revision="v1").iterdir())

error("offline, not cached", lambda: resolve_model_dir("org/tiny", revision="v2", local_files_only=True))
error("dataset, offline, not cached", lambda: read_source("org/other", DataOptions(local_files_only=True), "train"))
if phase == "online":
    command("no repo", ["train", "--model", "org/none", "--output.dir", str(run / "none")])
    error("gated", lambda: resolve_model_dir("org/gated"))
    error("private", lambda: resolve_model_dir("org/private"))
    error("no repo", lambda: resolve_model_dir("org/none"))
    error("no revision", lambda: resolve_model_dir("org/tiny", revision="v9"))
    error("dataset, gated", lambda: read_source("org/gated-text", DataOptions(), "train"))
    error("dataset, no repo", lambda: read_source("org/none", DataOptions(), "train"))
    error("dataset, no revision", lambda: read_source("org/text", DataOptions(revision="v9"), "train"))
    os.environ["HF_TOKEN"] = "hf_reader"  # huggingface_hub's default token: the private repo opens
    report["private tokenizer"] = len(load_tokenizer("org/private"))
else:
    import huggingface_hub.constants

    error("offline", lambda: resolve_model_dir("org/gated"))
    error("offline, partly cached", lambda: resolve_model_dir("org/private"))  # its tokenizer only, so far
    error("dataset, offline", lambda: read_source("org/gated-text", DataOptions(), "train"))
    huggingface_hub.constants.HF_HUB_OFFLINE = False  # online, but the hub is gone
    report["down, cached"] = resolve_model_dir("org/tiny", revision="v1").name
    error("network down", lambda: resolve_model_dir("org/gated"))
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """The repos the hub serves: a tiny model (main and v1, which differ), private and gated copies, a text
    dataset (its rows a JSONL file), and a corpus for ``moraft data``."""
    root = tmp_path_factory.mktemp("hub")
    main_dir = save_base(tiny_llama(0, hidden_size=32, num_layers=2), root / "main")
    v1_dir = save_base(tiny_llama(1, hidden_size=32, num_layers=3), root / "v1")
    for folder in (main_dir, v1_dir):  # what from_pretrained never reads, and must not be downloaded
        (folder / "onnx").mkdir()
        (folder / "onnx" / "model.onnx").write_bytes(b"\0" * 64)
        (folder / "model.Q4.gguf").write_bytes(b"\0" * 64)
    text = root / "text"
    (text / "data").mkdir(parents=True)
    rows = [{"text": f"{i}: the quick brown fox jumps over the lazy dog"} for i in range(16)]
    (text / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(
            f"Document {i}\n\n" + " ".join(f"Photosynthesis converts light energy number {i * 7 + j}." for j in range(12))
        )
    return {"main": main_dir, "v1": v1_dir, "text": text, "root": root, "corpus": corpus}


def run_phase(tmp: Path, phase: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp), phase], env={**env, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1][len("REPORT "):])


def test_every_command_downloads_from_the_hub_then_works_offline_and_errors_say_what_to_do(served, tmp_path):
    import shutil

    shutil.copytree(served["corpus"], tmp_path / "corpus")
    home = tmp_path / "hf"
    with LocalHub() as hub:
        hub.add("org/tiny", served["main"], revisions={"v1": served["v1"]})
        hub.add("org/private", served["main"], token="hf_reader")
        hub.add("org/gated", served["main"], gated=True)
        hub.add("org/text", served["text"], repo_type="dataset")
        hub.add("org/gated-text", served["text"], repo_type="dataset", gated=True)
        online = run_phase(tmp_path, "online", hub.env(home))
        url = hub.url
        requests = list(hub.requests)
    commands = ("train", "eval", "merge", "export-lora", "data")
    assert {name: online["status"][name] for name in commands} == dict.fromkeys(commands, 0), online
    # the CLI's face of a Hub error: one line, exit status 2, refused before any training
    assert online["status"]["no repo"] == 2 and not (tmp_path / "online" / "none").exists()
    assert online["stderr"]["no repo"][0].startswith("moraft train: error: model org/none: no model repo org/none")
    assert online["serve_layers"] == 3  # v1's model, not main's (2 layers)
    # only what from_pretrained reads: no onnx/ folder, no GGUF file, asked for or downloaded
    assert "onnx" not in online["snapshot"] and not any(name.endswith(".gguf") for name in online["snapshot"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(online["snapshot"])
    assert not [path for _, path in requests if path.endswith((".onnx", ".gguf"))]
    v1 = LocalHub.commit("org/tiny", "v1")
    assert (home / "hub" / "models--org--tiny" / "snapshots" / v1 / "config.json").is_file()
    # moraft data's --mine.base_tokenizer org/tiny (main): its tokenizer files only, no weights
    main_snapshot = home / "hub" / "models--org--tiny" / "snapshots" / LocalHub.commit("org/tiny")
    assert (main_snapshot / "tokenizer.json").is_file() and not (main_snapshot / "model.safetensors").exists()
    assert online["private tokenizer"] > 0  # with HF_TOKEN, the private repo loads

    errors = online["errors"]
    assert "gated repo" in errors["gated"] and f"{url}/org/gated" in errors["gated"]
    assert "hf auth login" in errors["gated"] and "HF_TOKEN" in errors["gated"]
    for case, repo in (("private", "org/private"), ("no repo", "org/none")):
        assert f"no model repo {repo} on {url}" in errors[case] and "HF_TOKEN" in errors[case], errors[case]
    assert "revision 'v9' is not in that repo" in errors["no revision"]
    assert "gated repo" in errors["dataset, gated"] and f"{url}/datasets/org/gated-text" in errors["dataset, gated"]
    assert f"no dataset repo org/none on {url}" in errors["dataset, no repo"]
    assert "revision 'v9' is not in that repo" in errors["dataset, no revision"]
    for case in ("offline, not cached", "dataset, offline, not cached"):
        assert "not in the Hugging Face cache" in errors[case] and "local_files_only" in errors[case], errors[case]
    assert all(message and "\n" not in message for message in errors.values()), errors

    # the hub is gone: everything runs from the cache
    offline = run_phase(tmp_path, "offline", {**hub.env(home), "HF_HUB_OFFLINE": "1"})
    assert offline["status"] == dict.fromkeys(commands, 0), offline
    assert offline["serve_layers"] == 3 and offline["down, cached"] == v1
    errors = offline["errors"]
    for case in ("offline", "dataset, offline"):
        assert "not in the Hugging Face cache" in errors[case] and "HF_HUB_OFFLINE=1" in errors[case], errors[case]
    assert "only partly in the Hugging Face cache" in errors["offline, partly cached"]
    assert f"cannot reach the Hugging Face Hub at {url}" in errors["network down"], errors["network down"]

