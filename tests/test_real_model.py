"""Real-model rows: the built-in SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``: LLaMA, 30 layers, hidden
576, 9 heads over 3 KV heads of 64, MLP 1536, vocabulary 49,152, tied embeddings, ChatML), where every other test
file runs random-init toy models. Its shapes are ones the toys lack: r̂ = 96 divides the 576-wide attention, but 78
(k_proj, v_proj: 576 → 192) and 130 (the MLP) divide nothing.

- The adapter invariants of tests/test_invariants.py on its real weights, for MoRA sharing and rotation and, as the
  reference, PEFT's LoRA, all-linear, with random non-zero adapter weights: output unchanged at init; the disabled
  adapter is the base; save/load exact; merged = unmerged (PEFT's merge_adapter, merge_and_unload and ``moraft
  merge``), unmerge restores; only adapter parameters get gradients.
- ``moraft export-lora``: the sharing adapter as a LoRA adapter, loaded by PEFT with MoRA's registration taken out
  (tests/test_interop_export.py loads exports in a process without moraft), computes the MoRA adapter's logits;
  rotation's export reports the error of its truncated SVD.
- ``moraft eval --tasks`` on the model by name; ``moraft serve`` answering a chat request through its ChatML
  template, with and without an adapter.
- Every method of ``moraft train --method`` (through `moraft.train.train`) taking a training step on it and saving an
  adapter that loads back.

**Tolerances.** Float32 through 30 layers is not exact: two float32 computations of the same logits (merged and
unmerged weights, LoRA factors and MoRA operators) differ by rounding carried through the network. `noise` measures
that rounding on this model and these inputs: the largest gap between its float32 and float64 logits (about 1e-4 on
logits up to about 35: some 25 float32 ulps of the largest logit, through 30 layers). Two float32 results are each
about `noise` from the exact one, so they may differ by twice that; the checks allow `SLACK` times it. Everything that
computes the very same thing (a reloaded adapter, a disabled one) is compared exactly.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import re
import warnings
from functools import partial
from pathlib import Path

import httpx
import peft.mapping
import peft.tuners.lora
import pytest
import torch
from helpers import LiveServer, run_cli
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moraft.train.runner as runner
from moraft import MoraConfig
from moraft.models import SMOLLM2, load_causal_lm
from moraft.serve.server import build_server
from moraft.testing import adapter_parameters, logits, randomize_adapter
from moraft.train import train
from moraft.train.options import TrainOptions
from moraft.train.peft_methods import METHODS, config_class, lora_shapes, trainable_count

pytestmark = pytest.mark.real_model

# × `noise`: two float32 results, each about `noise` from the exact logits, with a margin of 2 (measured: every
# merged and exported model here is within 1 × noise of the unmerged adapter)
SLACK = 4
ROWS = {  # name -> a fresh config; each row's adapter weights are then drawn at random (`randomize_adapter`)
    "mora-sharing": lambda: MoraConfig(r=8, compression="sharing", target_modules="all-linear"),
    "mora-rotation": lambda: MoraConfig(r=8, compression="rotation", target_modules="all-linear"),
    "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
}
TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Water boils at one hundred degrees Celsius at sea level, my friend.",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# -- the model, its inputs and its float32 rounding ------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(smollm2_dir):
    """(model, tokenizer): the built-in model loaded by name, in float32 and eval mode. Read-only: a test that adapts
    or trains a model does it on a copy."""
    model, tokenizer = load_causal_lm(SMOLLM2, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def ids(base) -> torch.Tensor:
    """Two rows of real text, cut to the same length (no padding)."""
    rows = base[1](TEXTS)["input_ids"]
    n = min(map(len, rows))
    return torch.tensor([row[:n] for row in rows])


@pytest.fixture(scope="module")
def base_logits(base, ids) -> torch.Tensor:
    return logits(base[0], ids)


@pytest.fixture(scope="module")
def noise(base, ids, base_logits) -> float:
    """The float32 rounding of the model's logits on ``ids``: max |float32 − float64|."""
    with torch.no_grad():
        exact = copy.deepcopy(base[0]).double()(input_ids=ids).logits
    gap = (base_logits.double() - exact).abs().max().item()
    scale = base_logits.abs().max().item()
    # rounding, not a bug in the model: at most 8 float32 ulps (2^-23 ≈ 1.2e-7) of the largest logit per layer
    assert 0 < gap < 30 * 8 * 2**-23 * scale, (gap, scale)
    return gap


def assert_within(got: torch.Tensor, want: torch.Tensor, noise: float) -> None:
    torch.testing.assert_close(got, want, atol=SLACK * noise, rtol=0)


def tuner_layers(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


# -- the adapter invariants ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapted(base, ids, tmp_path_factory):
    """name -> the row's PEFT model on a copy of the base with random non-zero adapter weights, saved, and its
    logits at init and with those weights. Built once per row (``adapted.clear()`` drops them, to be built again if
    asked for); a test that merges unmerges before it ends."""
    done = {}

    def make(name: str) -> dict:
        if name not in done:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PEFT's notes on all-linear, tied embeddings
                model = get_peft_model(copy.deepcopy(base[0]), ROWS[name]()).eval()
            at_init = logits(model, ids)
            randomize_adapter(model, seed=3, std=0.01)
            directory = tmp_path_factory.mktemp(name) / "adapter"
            model.save_pretrained(directory)
            done[name] = dict(model=model, at_init=at_init, logits=logits(model, ids), dir=directory)
        return done[name]

    make.clear = done.clear
    return make


@pytest.mark.parametrize("name", ROWS)
class TestRealInvariants:
    def test_unchanged_at_init_and_changed_by_random_weights(self, name, adapted, base_logits, noise):
        row = adapted(name)
        assert torch.equal(row["at_init"], base_logits)
        assert (row["logits"] - base_logits).abs().max() > 1000 * noise  # the random adapter is no rounding

    def test_disabled_adapter_is_the_base(self, name, adapted, ids, base_logits):
        model = adapted(name)["model"]
        with model.disable_adapter():
            assert torch.equal(logits(model, ids), base_logits)

    def test_save_load_is_exact(self, name, adapted, base, ids):
        row = adapted(name)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base[0]), row["dir"]).eval()
        saved, got = adapter_parameters(row["model"]), adapter_parameters(loaded)
        assert saved and saved.keys() == got.keys()
        assert all(torch.equal(got[key], value) for key, value in saved.items())
        assert torch.equal(logits(loaded, ids), row["logits"])

    def test_merge_matches_unmerged_and_unmerge_restores(self, name, adapted, ids, noise):
        row = adapted(name)
        model, layers = row["model"], tuner_layers(row["model"])
        before = {key: layer.get_base_layer().weight.detach().clone() for key, layer in layers.items()}
        delta = {key: layer.get_delta_weight("default") for key, layer in layers.items()}
        try:
            model.merge_adapter()
            for key, layer in layers.items():  # W0 + ΔW, in float32
                assert torch.equal(layer.get_base_layer().weight, before[key] + delta[key]), key
            merged = logits(model, ids)
            assert_within(merged, row["logits"], noise)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.merge_adapter()  # merging twice is a no-op (PEFT warns): ΔW added again would show
            assert torch.equal(logits(model, ids), merged)
        finally:
            model.unmerge_adapter()
        inf = partial(torch.linalg.vector_norm, ord=math.inf)  # the largest |entry|
        for key, layer in layers.items():
            # (W0 + ΔW) − ΔW: two float32 roundings, each at most half an ulp of max |W0| + max |ΔW|
            bound = (inf(before[key]) + inf(delta[key])) * 2**-23
            assert inf(layer.get_base_layer().weight - before[key]) <= bound, key
        assert_within(logits(model, ids), row["logits"], noise)

    def test_merge_and_unload_leaves_a_plain_model_computing_the_same(self, name, adapted, ids, noise):
        row = adapted(name)
        merged = copy.deepcopy(row["model"]).merge_and_unload()
        assert not tuner_layers(merged)
        assert_within(logits(merged, ids), row["logits"], noise)

    def test_moraft_merge_writes_a_model_computing_the_same(self, name, adapted, ids, noise, tmp_path, capsys):
        row = adapted(name)
        # the base by its built-in name, as the adapter records it
        assert json.loads((row["dir"] / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2
        status, _, err = run_cli(["merge", SMOLLM2, str(row["dir"]), str(tmp_path / "merged")], capsys)
        assert status == 0, err
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
        assert_within(logits(merged, ids), row["logits"], noise)

    def test_only_adapter_parameters_get_gradients(self, name, adapted, ids):
        model = adapted(name)["model"]
        adapter = adapter_parameters(model)
        try:
            model(input_ids=ids, labels=ids).loss.backward()
            assert {key for key, p in model.named_parameters() if p.grad is not None} == set(adapter)
            for key, param in adapter.items():
                assert param.grad.dtype == torch.float32 and param.grad.abs().sum() > 0, key
        finally:
            model.zero_grad(set_to_none=True)


# -- export-lora -----------------------------------------------------------------------------------------------------

def test_export_lora_of_sharing_computes_the_same_in_vanilla_peft(adapted, base, ids, noise, tmp_path, capsys,
                                                                  monkeypatch):
    row = adapted("mora-sharing")
    # the base from the adapter's own record (the built-in name), the exact rank: the largest r̂ (130, the MLP's)
    status, _, err = run_cli(["export-lora", str(row["dir"]), str(tmp_path / "lora")], capsys)
    assert status == 0, err
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 130
    # vanilla PEFT: MoRA's registration (its entries in PEFT's method tables) taken out while the export loads
    registered = [table for table in vars(peft.mapping).values() if isinstance(table, dict) and "MORA" in table]
    assert registered
    for table in registered:
        monkeypatch.delitem(table, "MORA")
    model = PeftModel.from_pretrained(copy.deepcopy(base[0]), tmp_path / "lora").eval()
    assert type(model.peft_config["default"]) is LoraConfig
    layers = tuner_layers(model).values()
    assert len(layers) == 7 * 30 and all(type(layer) is peft.tuners.lora.Linear for layer in layers)
    assert_within(logits(model, ids), row["logits"], noise)


def test_export_lora_of_rotation_reports_the_error_of_each_module(base, tmp_path, capsys):
    # four modules of two shapes (each export is one SVD): q_proj 576 → 576 and down_proj 1536 → 576
    config = MoraConfig(r=8, compression="rotation", target_modules=["q_proj", "down_proj"],
                        layers_to_transform=[0, 29])
    model = randomize_adapter(get_peft_model(copy.deepcopy(base[0]), config), seed=4, std=0.01)
    model.save_pretrained(tmp_path / "rotation")
    status, out, err = run_cli(["export-lora", str(tmp_path / "rotation"), str(tmp_path / "lora"), "--rank", "32"],
                               capsys)
    assert status == 0, err
    # one line a module: "model.layers.0.self_attn.q_proj: rank 32, relative Frobenius error 9.001e-01"
    reported = {m[1]: float(m[2]) for m in re.finditer(r"^(\S+): rank 32, relative Frobenius error (\S+)$", out, re.M)}
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    deltas = model.base_model.delta_weights()
    assert len(deltas) == 4 and reported.keys() == deltas.keys(), out
    for module, delta in deltas.items():
        b, a = tensors[f"base_model.model.{module}.lora_B.weight"], tensors[f"base_model.model.{module}.lora_A.weight"]
        error = ((delta - b @ a).norm() / delta.norm()).item()  # what the exported factors miss of ΔW
        assert 0 < error < 1  # a full-rank ΔW (random M): rank 32 of 576 keeps a part of it
        assert reported[module] == pytest.approx(error, rel=1e-3), module  # printed to 4 digits


# -- eval and serve --------------------------------------------------------------------------------------------------

TASKS = [  # the base model's log-likelihoods rank Paris first by more than 6 nats
    {"id": "france", "prompt": "The capital of France is", "options": ["Paris", "Berlin", "Madrid", "Rome"],
     "answer": 0},
    {"id": "planet", "prompt": "The largest planet in the Solar System is",
     "options": ["Mercury", "Jupiter", "Mars", "Venus"], "answer": 1},
    {"id": "sun", "prompt": "The Sun rises in the", "options": ["west", "north", "east", "south"], "answer": 2},
    {"id": "water", "prompt": "Water freezes at a temperature of",
     "options": ["50 degrees Celsius", "100 degrees Celsius", "200 degrees Celsius", "0 degrees Celsius"],
     "answer": 3},
]


def test_eval_tasks_on_the_model_by_name(smollm2_dir, tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(task) + "\n" for task in TASKS))
    argv = ["eval", SMOLLM2, "--tasks", str(tasks), "--output", str(tmp_path / "metrics.json")]
    status, stdout, err = run_cli(argv, capsys)
    assert status == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["evaluated"] == f"base model {SMOLLM2}" and summary["num_tasks"] == 4
    rows = {row["id"]: row for row in json.loads((tmp_path / "eval_tasks.json").read_text())["rows"]}
    assert rows["france"]["prediction"] == 0  # the model is deterministic and sure of this one
    for row in rows.values():
        lls = row["loglikelihoods"]
        assert len(lls) == 4 and row["prediction"] == lls.index(max(lls))
    assert summary["accuracy"] == sum(row["prediction"] == row["answer"] for row in rows.values()) / 4


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], n: int, eos: int) -> tuple[list[int], list[float]]:
    """Greedy decoding with the KV cache, stopped after EOS: the tokens, and each step's gap between the two
    largest logits."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens, gaps = [], []
    for _ in range(n):
        top = out.logits[0, -1].float().topk(2)
        tokens.append(top.indices[0].item())
        gaps.append((top.values[0] - top.values[1]).item())
        if tokens[-1] == eos:
            break
        out = model(input_ids=top.indices[:1].view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return tokens, gaps


def test_serve_answers_a_chat_through_the_chat_template(base, noise, tmp_path):
    model, tokenizer = base
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")  # ChatML
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # an adapter strong enough to change the answer (weaker ones still say Paris), so that serving it is seen
    config = MoraConfig(r=8, compression="sharing", target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_adapter = randomize_adapter(get_peft_model(copy.deepcopy(model), config), seed=3, std=0.025).eval()
    with_adapter.save_pretrained(tmp_path / "adapters" / "share")
    expected, gaps = greedy(with_adapter, prompt_ids, 16, tokenizer.eos_token_id)
    # served logits are float32 computations of their own (batched, the adapter beside the base weights): the
    # greedy tokens must agree wherever the two best are further apart than rounding could move them
    agreed = next((i for i, gap in enumerate(gaps) if gap < 100 * noise), len(gaps))

    server = build_server(copy.deepcopy(model), tokenizer, tmp_path / "adapters", base_name="smollm2")
    try:
        with LiveServer(server.app) as live, httpx.Client(base_url=live.url, timeout=120) as client:

            def chat(name: str) -> dict:
                body = {"model": name, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
                response = client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                answer = response.json()
                assert answer["object"] == "chat.completion" and answer["model"] == name
                assert answer["usage"]["prompt_tokens"] == len(prompt_ids)
                return answer

            plain = chat("smollm2")["choices"][0]
            assert "Paris" in plain["message"]["content"] and plain["finish_reason"] == "stop", plain
            adapted_answer = chat("share")
    finally:
        server.close()
    text = adapted_answer["choices"][0]["message"]["content"]
    assert text.startswith(tokenizer.decode(expected[:agreed], skip_special_tokens=True))
    if agreed == len(expected):
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        assert adapted_answer["usage"]["completion_tokens"] == len(expected)
    assert text != plain["message"]["content"]  # the adapter was applied


# -- every method of moraft train ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainee(base, adapted):
    """One copy of the base that the method rows train in turn: each row's PEFT model is unloaded after it (the
    adapted layer's base weights as they were, checked), so that a row pays for no copy of the model (but full
    fine-tuning, and mora, which loads the model by its name)."""
    adapted.clear()  # the invariant rows' three models (1.6 GB), done with by now: room for full fine-tuning's
    # Trainer.train starts with accelerate's gc.collect(), which scans every object of the session (~0.4 s a run);
    # objects frozen by gc.freeze are not scanned, so each run pays only for the objects it made
    gc.collect()
    gc.freeze()
    yield {"model": copy.deepcopy(base[0])}
    gc.unfreeze()


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    rows = ["The capital of France is Paris.", "Water boils at one hundred degrees.", "The Earth goes round the Sun.",
            "A spider has eight legs."]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))
    return path


def test_miss_knob_search_stops_at_the_narrowest_input(base):
    """PEFT's MiSS takes r up to a layer's d_in; the search for its knob tries nothing past that (each value it tries
    builds a meta copy of the model: past 576, up to the MLP's 1536, the search took a minute on this model)."""
    shapes = lora_shapes(base[0], {"target_modules": "all-linear"})
    candidates = METHODS["miss"].candidates(shapes)
    assert candidates == list(range(1, 577))  # every d_in is 576 or 1536
    miss = config_class(METHODS["miss"])
    for r, valid in ((576, True), (577, False)):
        count = trainable_count(base[0], miss(r=r, target_modules="all-linear", task_type="CAUSAL_LM"))
        assert (count is not None) == valid, r


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_and_its_adapter_loads_back(name, base, trainee, texts, ids, base_logits, tmp_path,
                                                        monkeypatch):
    """A step of batch 2 on short texts, every method on the last decoder layer's seven projections (every shape
    of the model: 576 → 576, 192 and 1536, and 1536 → 576), where the backward pass is short."""
    model = copy.deepcopy(base[0]) if name == "full" else trainee["model"]
    if name != "mora":  # mora loads the model by its name, as `moraft train --model builtin:smollm2-...` does
        monkeypatch.setattr(runner, "load_model", lambda options: (model, base[1]))
    options = TrainOptions.from_dict({
        "model": {"name_or_path": SMOLLM2},
        "data": {"dataset": str(texts), "seq_length": 32},
        "adapter": {"method": name, "r": 4, "target_modules": r"model\.layers\.29\..*_proj"},
        "optimization": {"batch_size": 2, "max_steps": 1, "learning_rate": 1e-3},
        "output": {"dir": str(tmp_path / "run"), "logging_steps": 1, "save_steps": 0},
    })
    try:
        result = train(options)
        losses = [entry["loss"] for entry in result.history if "loss" in entry]
        assert len(losses) == 1 and math.isfinite(losses[0]), losses
        trained = logits(result.model, ids)
        # the step moved the model (an adapter at its initial state would leave the base's logits) and kept it finite
        assert trained.isfinite().all() and not torch.equal(trained, base_logits)
        if name == "full":
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run", dtype=torch.float32)
            assert torch.equal(logits(reloaded, ids), trained)
            return
        assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2
        reloaded = PeftModel.from_pretrained(result.model.unload(), tmp_path / "run")
        assert torch.equal(logits(reloaded, ids), trained)
        model = reloaded.unload()
        # unload put the base back, and the adapted layer's own weights did not train
        assert not tuner_layers(model)
        state = model.state_dict()
        for key, value in base[0].state_dict().items():
            if key.startswith("model.layers.29."):
                assert torch.equal(state[key], value), key
    except BaseException:
        trainee["model"] = copy.deepcopy(base[0])  # whatever this row left, the next starts from the base
        raise
