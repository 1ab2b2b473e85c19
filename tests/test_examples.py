"""Every script in examples/ runs as a user would run it (a subprocess, tiny sizes, offline), and what it produced is
checked here independently: files written and loadable, outputs equal to an offline reference, HTTP answers
received. Exit status 0 alone proves nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import moraft
from moraft.train import TrainOptions, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# one torch thread per subprocess: on a machine that other jobs share, threads that wait for each other spin, and a
# run that takes seconds takes minutes
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}


def run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"


def save_base(directory: Path) -> Path:
    """The built-in tiny LLaMA, small, saved as a local model directory (what a real base would be)."""
    model, tokenizer = tiny_llama(seed=0, hidden_size=64, num_layers=2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def save_mora_adapter(base: Path, out: Path, compression: str, seed: int) -> Path:
    """A MoRA adapter with random non-zero M, big enough to change the base model's greedy text."""
    torch.manual_seed(seed)
    model = get_peft_model(load(base), moraft.MoraConfig(r=4, compression=compression, target_modules="all-linear",
                                                         init_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mora_M" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 30]])


# -- examples/peft_quickstart.py ---------------------------------------------------------------------------------------


def test_peft_quickstart_trains_saves_reloads_and_merges(tmp_path):
    out = tmp_path / "quickstart"
    proc = run(EXAMPLES / "peft_quickstart.py", "--out", out, "--steps", "8", "--compression", "rotation",
               cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert proc.stdout.count("ok: ") == 5, output(proc)

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MORA" and config["compression"] == "rotation"
    base = load(out / "base")
    adapted = PeftModel.from_pretrained(load(out / "base"), out / "adapter").eval()
    merged = load(out / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"  # a plain transformers model, no PEFT layers left
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logits(merged, ids), logits(adapted, ids), atol=1e-4)
    assert not torch.allclose(logits(base, ids), logits(adapted, ids), atol=1e-3)  # training changed the model


# -- examples/train.yaml -------------------------------------------------------------------------------------------


def test_train_yaml_runs_as_written(tmp_path):
    recipe = yaml.safe_load((EXAMPLES / "train.yaml").read_text())
    TrainOptions.from_dict(recipe).validate()  # every key is an option of its group
    run_dir = tmp_path / "run"
    proc = run("-m", "moraft", "train", "--config", EXAMPLES / "train.yaml", "--output.dir", run_dir, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)

    # the run used exactly the file's options (output.dir aside)
    saved = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    expected = TrainOptions.from_dict(recipe).replace(output={"dir": str(run_dir)}).to_dict()
    assert saved == expected
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "MORA" and adapter["compression"] == recipe["adapter"]["compression"]
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "loss.png").is_file()
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == recipe["optimization"]["max_steps"] and summary["method"] == "mora"
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [e["step"] for e in entries if "char_accuracy" in e]
    every = recipe["output"]["eval_steps"]
    assert evaluated == list(range(every, recipe["optimization"]["max_steps"] + 1, every))


# -- examples/serve_client.py ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def greedy_text(base: Path, adapter: Path, prompt: str, max_tokens: int) -> str:
    """What the adapter generates greedily offline, through PEFT (the reference the server must match)."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(load(base), adapter).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_serve_client_talks_to_moraft_serve(tmp_path, monkeypatch):
    """... to a server that wants an API key: both read MORAFT_API_KEY."""
    pytest.importorskip("uvicorn")
    monkeypatch.setitem(ENV, "MORAFT_API_KEY", "sk-example")
    base = save_base(tmp_path / "base")
    adapters = {name: save_mora_adapter(base, tmp_path / "adapters" / name, compression, seed)
                for seed, (name, compression) in enumerate({"share": "sharing", "rot": "rotation"}.items())}
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moraft", "serve", "--base", str(base), "--adapters",
                               str(tmp_path / "adapters"), "--port", str(port), "--log_level", "warning"],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "moraft serve did not start"
            time.sleep(0.25)
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(url + "/v1/models", timeout=30)
        answers = tmp_path / "answers.json"
        proc = run(EXAMPLES / "serve_client.py", "--url", url, "--prompt", "key:", "--max_tokens", "8",
                   "--json", answers, cwd=tmp_path, timeout=300)
    finally:
        server.terminate()
        server.wait(30)
    assert proc.returncode == 0, output(proc)

    got = json.loads(answers.read_text())
    assert got["models"] == ["base", "rot", "share"]
    for name, adapter in adapters.items():
        assert got["completions"][name] == greedy_text(base, adapter, "key:", 8), name
    assert got["completions"]["rot"] != got["completions"]["share"]  # each request got its own adapter
    first = next(iter(got["streamed"]))
    assert got["streamed"][first] == got["completions"][first]
    assert isinstance(got["chat"][first], str)


# -- examples/export_vllm.py ---------------------------------------------------------------------------------------


def test_export_vllm_writes_lora_adapters_that_plain_peft_loads(tmp_path):
    base = save_base(tmp_path / "base")
    folder = tmp_path / "adapters"
    mora = {"share": save_mora_adapter(base, folder / "share", "sharing", 1),
            "trunc": save_mora_adapter(base, folder / "trunc", "truncation", 2)}
    out = tmp_path / "lora"
    proc = run(EXAMPLES / "export_vllm.py", folder, out, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)

    ranks = []
    for name, adapter in mora.items():
        config = json.loads((out / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["bias"] == "none" and not config.get("modules_to_save")
        ranks.append(config["r"])
        # sharing and truncation export exactly: plain PEFT LoRA gives the MoRA adapter's logits
        lora = PeftModel.from_pretrained(load(base), out / name).eval()
        original = PeftModel.from_pretrained(load(base), adapter).eval()
        assert torch.allclose(logits(lora, IDS), logits(original, IDS), atol=1e-5), name
    max_lora_rank = min(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= max(ranks))
    command = f"vllm serve {base} --enable-lora --max-lora-rank {max_lora_rank}"
    assert command in proc.stdout and f"share={out / 'share'}" in proc.stdout, output(proc)


def test_export_vllm_needs_a_rank_for_rotation(tmp_path):
    base = save_base(tmp_path / "base")
    adapter = save_mora_adapter(base, tmp_path / "adapters" / "rot", "rotation", 3)
    proc = run(EXAMPLES / "export_vllm.py", adapter, tmp_path / "lora", cwd=tmp_path)
    assert proc.returncode != 0 and "--rank" in proc.stderr, output(proc)

    proc = run(EXAMPLES / "export_vllm.py", adapter, tmp_path / "lora", "--rank", "16", cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    config = json.loads((tmp_path / "lora" / "rot" / "adapter_config.json").read_text())
    assert config["r"] == 16 and "--max-lora-rank 16" in proc.stdout
    assert "largest relative error" in proc.stdout and "(exact)" not in proc.stdout


# -- examples/distributed/ ---------------------------------------------------------------------------------------------
# test_train_distributed.py trains with zero2.json and zero3.json under torchrun (two processes on CPU) and checks the
# adapter against a single process's; here, what holds for any run: the "auto" values are all filled from the
# Trainer's arguments, whatever the batch, and fsdp2.json is what TrainingArguments and accelerate expect.


def _autos(tree, path: str = "") -> list[str]:
    """The keys of a (nested) DeepSpeed config whose value is still "auto"."""
    if isinstance(tree, dict):
        return [key for name, value in tree.items() for key in _autos(value, f"{path}{name}.")]
    return [path.rstrip(".")] if tree == "auto" else []


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_configs_take_any_batch_from_the_trainer(name, stage):
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    raw = json.loads((EXAMPLES / "distributed" / name).read_text())
    # no optimizer or scheduler of DeepSpeed's own: the Trainer's AdamW and schedule run, as in a single process
    assert raw["zero_optimization"]["stage"] == stage and "optimizer" not in raw and "scheduler" not in raw
    assert raw["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    model, _ = tiny_llama(seed=0, hidden_size=64, num_layers=1)
    try:
        for batch, accumulation, clip in [(1, 1, 1.0), (3, 5, 0.5)]:
            args = TrainingArguments(output_dir="unused", per_device_train_batch_size=batch, use_cpu=True,
                                     gradient_accumulation_steps=accumulation, max_grad_norm=clip, report_to="none")
            config = HfTrainerDeepSpeedConfig(str(EXAMPLES / "distributed" / name))
            config.trainer_config_process(args)
            config.trainer_config_finalize(args, model, num_training_steps=10)  # raises on a mismatch
            assert not _autos(config.config), _autos(config.config)
            assert config.config["train_batch_size"] == batch * accumulation  # × the processes, 1 here
            assert config.config["gradient_clipping"] == clip and config.config["bf16"]["enabled"] is False
            assert config.config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    finally:
        unset_hf_deepspeed_config()  # the config registers itself globally (is_deepspeed_zero3_enabled)


@pytest.mark.parametrize("fsdp, reshard", [("full_shard", True), ("shard_grad_op", False)])
def test_fsdp2_config_parses_and_wraps_each_decoder_layer(fsdp, reshard):
    """FSDP runs only on GPUs (accelerate 1.15), so on CPU this is as far as the config goes: TrainingArguments reads
    it with --distributed.fsdp's word, accelerate builds its FSDP2 plugin from it, and the plugin's policy wraps each
    decoder layer of a MoRA model (the class the model names in _no_split_modules, LlamaDecoderLayer here)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from moraft.train import AdapterOptions
    from moraft.train.methods import apply_method

    args = TrainingArguments(output_dir="unused", fsdp=fsdp, use_cpu=True, report_to="none",
                             fsdp_config=str(EXAMPLES / "distributed" / "fsdp2.json"))
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": reshard,
        "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False, "activation_checkpointing": False,
    }
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2
    model = apply_method(tiny_llama(seed=0, hidden_size=32, num_layers=2)[0], AdapterOptions(method="mora"))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]


# -- examples/distill_comprehension.py -----------------------------------------------------------------------------


def test_distill_comprehension_runs_the_recipe_small(tmp_path):
    """ETRC's distillation, tiny: a scripted teacher on loopback, the export, `moraft train`, `moraft serve` and the
    student's replies counted (a 2-step student writes no valid JSON: rejected, counted, never fatal)."""
    work = tmp_path / "distill"
    proc = run(EXAMPLES / "distill_comprehension.py", "--workdir", work, "--documents", "8", "--sample", "4",
               "--steps", "2", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, output(proc)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["teacher"]["sampled"] == summary["teacher"]["generated"] == 4 == summary["distillation_examples"]
    assert summary["teacher"]["rejected"] == 0
    student = summary["student"]
    assert student["sampled"] == 8 and student["generated"] + student["failed"] == 8
    parsed = summary["student_parsed_seen"] + summary["student_parsed_held_out"]
    assert student["rejected"] + parsed == student["generated"]  # every reply either parsed or counted as rejected
    assert (work / "adapters" / "student" / "adapter_config.json").is_file()
