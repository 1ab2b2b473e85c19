"""Helpers of the tests that are not model factories (those, and the loopback uvicorn server `LiveServer`, are in
`moraft.testing`): short training runs, the peft-mora fixture, PEFT reference models and live servers for the serve
tests."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moraft import MoraConfig
from moraft.testing import LiveServer, free_socket, save_adapter  # noqa: F401 (re-exported for the tests)
from moraft.train import TrainOptions

# -- short training runs ------------------------------------------------------------------------------------------

TINY = {
    "model": {"builtin_hidden_size": 32, "builtin_num_layers": 2},
    "data": {"num_pairs": 8},
    "optimization": {"batch_size": 4, "max_steps": 3, "learning_rate": 1e-2},
    "output": {"logging_steps": 1, "save_steps": 0},
}


def tiny_options(output_dir, **groups: dict) -> TrainOptions:
    """Options for a run of a few seconds: a 2-layer, 32-wide built-in model on 8 UUID pairs. ``groups`` override
    options by group, e.g. ``tiny_options(tmp, adapter={"method": "lora"}, optimization={"max_steps": 2})``."""
    return TrainOptions.from_dict(TINY).replace(output={"dir": str(output_dir)}).replace(**groups)


def tiny_flags(output_dir) -> list[str]:
    """`tiny_options` as ``moraft train`` flags."""
    flags = [f"--{group}.{key}={value}" for group, values in TINY.items() for key, value in values.items()]
    return flags + ["--output.dir", str(output_dir)]


# -- the command line ---------------------------------------------------------------------------------------------


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``moraft ARGV`` run in this process."""
    from moraft.cli import main

    try:
        main(argv)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_refused(argv, capsys, expected: str, out_dir: Path) -> None:
    """``moraft ARGV`` is bad input: exit status 2, one line on stderr that says ``expected``, nothing written to
    ``out_dir``."""
    status, _, err = run_cli(argv, capsys)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert not Path(out_dir).exists()


# -- outputs ------------------------------------------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    """Staging directories left beside an output (there must be none)."""
    return sorted(p.name for p in parent.iterdir() if re.match(r"\..*\.(partial|replaced)$", p.name))


# -- the checkpoints written by the MoRA authors' peft-mora ---------------------------------------------------------

# CI clones the repository with shared/ beside it
FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "kongds-peft-mora"


def fixture_base() -> LlamaForCausalLM:
    """The fixture's base model, loaded as its README says."""
    assert FIXTURE.is_dir(), f"the peft-mora fixture is missing: expected {FIXTURE} (shared/ beside the repository)"
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(FIXTURE / "base"))
    model.load_state_dict(load_file(FIXTURE / "base" / "model.safetensors"))
    return model.eval()


def fixture_expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


# -- references for the serve tests -------------------------------------------------------------------------------


def save_served_adapter(base_dir: Path, out: Path, kind: str, seed: int, **overrides) -> Path:
    """An all-linear r=4 adapter for the base in ``base_dir`` (kind: a MoRA compression or "lora"; ``overrides``:
    more config fields), its weights random and large enough (std 0.5 for M, 0.3 for LoRA's A and B) that every
    adapter changes the greedy continuation."""
    if kind == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **overrides)
    else:
        config = MoraConfig(r=4, compression=kind, target_modules="all-linear", **overrides)
    save_adapter(load_model(base_dir), config, out, seed=seed, std=0.3 if kind == "lora" else 0.5)
    return out


def save_served_adapters_with_faults(base_dir: Path, folder: Path, nan_kind: str = "sharing") -> Path:
    """``folder`` with four adapters for the base in ``base_dir``: two good ones (``share``: MoRA sharing, ``lora``),
    ``nan`` (a ``nan_kind`` adapter whose weights are all NaN: a diverged run) and ``edited`` (its adapter_config.json
    says r=2 for weights trained with r=4)."""
    save_served_adapter(base_dir, folder / "share", "sharing", seed=1)
    save_served_adapter(base_dir, folder / "lora", "lora", seed=2)
    nan = save_served_adapter(base_dir, folder / "nan", nan_kind, seed=3)
    weights = load_file(nan / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, nan / "adapter_model.safetensors")
    edited = save_served_adapter(base_dir, folder / "edited", "sharing", seed=4)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    return folder


def load_model(base_dir: Path, adapter_dir: Path | None = None) -> torch.nn.Module:
    """The base model saved in ``base_dir``, with the adapter in ``adapter_dir`` through PEFT (or none), in eval
    mode: what a served request must compute."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir).eval()


def reference(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int,
              ignore_eos: bool = False) -> list[int]:
    """Offline greedy generation with PEFT (or the plain base): ``generate``, stopped after the first EOS; with
    ``ignore_eos``, a plain loop that recomputes the whole sequence each step (no KV cache at all)."""
    model = load_model(base_dir, adapter_dir)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        if ignore_eos:
            for _ in range(max_new_tokens):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            return ids[0, len(prompt_ids) :].tolist()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the body with one torch thread (as benchmarks/serve.py does): on a CPU shared with other jobs, torch's
    worker threads spin and make each small forward pass of a served model many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def metric(client, name: str, default: float | None = None) -> float:
    """A value from a server's /metrics (``client``: an ``httpx.Client`` on it); ``name`` may include labels, e.g.
    'x_total{reason="stop"}'."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    if default is None:
        raise KeyError(name)
    return default


def error_of(response, status: int) -> dict:
    """The OpenAI-style error of ``response`` (an ``httpx.Response``), which must have ``status``."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


class MoraftServe(LiveServer):
    """A real ``moraft serve`` (`moraft.serve.server.build_server`: the engine, the adapter store, the HTTP API) of
    the base model in ``base_dir`` on a loopback port; ``url + "/v1"`` is its OpenAI base URL and ``base_name`` its
    model id. ``adapters_dir`` defaults to an empty folder; ``server`` options go to ``build_server``."""

    def __init__(self, base_dir: Path, adapters_dir: Path | None = None, base_name: str = "base", **server) -> None:
        import tempfile

        from moraft.adapters import load_causal_lm
        from moraft.serve.server import build_server

        self._empty = None if adapters_dir is not None else tempfile.TemporaryDirectory()
        model, tokenizer = load_causal_lm(base_dir)
        self.moraft = build_server(model, tokenizer, adapters_dir or self._empty.name, base_name=base_name, **server)
        self.base_name = base_name
        super().__init__(self.moraft.app)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.moraft.close()
        if self._empty is not None:
            self._empty.cleanup()
