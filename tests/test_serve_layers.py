"""moraft serve without HTTP: per-row adapter math against PEFT, the adapter store, sampling and stop strings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import load_model, save_served_adapter
from peft import KasaConfig, LoraConfig

import moraft
from moraft.adapters import load_causal_lm
from moraft.serve.adapters import (
    AdapterBusy,
    AdapterLoadError,
    AdapterStore,
    AdapterTooLarge,
    UnknownAdapter,
    load_adapter,
)
from moraft.serve.layers import ServedLinear, wrap_model
from moraft.serve.sampling import SamplingParams, TextTracker, sample
from moraft.testing import char_tokenizer, input_ids, logits, save_adapter

# one row per kind of adapter moraft trains: (adapter kind, config overrides)
ADAPTERS = {
    "sharing": ("sharing", {}),
    "sharing-b": ("sharing", {}),
    "sharing-contiguous": ("sharing", {"input_grouping": "contiguous", "output_grouping": "contiguous"}),
    "rotation": ("rotation", {}),
    "rotation-b": ("rotation", {}),  # a second adapter per operator: rows of both share one batched matmul
    "rotation-compat": ("rotation", {"peft_mora_compat": True}),
    "decouple": ("decouple", {}),
    "decouple-b": ("decouple", {}),
    "truncation": ("truncation", {}),
    "lora": ("lora", {}),
    "lora-rslora-pattern": ("lora", {"use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}}),
}


@pytest.fixture(scope="module")
def env(serve_base, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("serve-layers-adapters")
    for seed, (name, (kind, overrides)) in enumerate(ADAPTERS.items()):
        save_served_adapter(serve_base, adapters / name, kind, seed=10 + seed, **overrides)
    return serve_base, adapters


def served_model(base: Path, adapters: Path, max_bytes: int = 2**30):
    model = load_model(base)
    rows, shapes = wrap_model(model)
    return model, rows, AdapterStore(adapters, shapes, torch.device("cpu"), max_bytes, base_config=model.config)


@pytest.mark.parametrize("layout", ["distinct", "segments"])
def test_mixed_batch_logits_equal_each_adapters_peft_model(env, layout):
    """One forward, every row with its own adapter (or none), equals PEFT's model for that row's adapter."""
    base, adapters = env
    model, rows, store = served_model(base, adapters)
    names = [*ADAPTERS, None]
    if layout == "segments":  # many rows per adapter: the served layers multiply each adapter's rows together
        names = [n for n in names for _ in range(4)]
    torch.manual_seed(0)
    ids = torch.randint(4, 100, (len(names), 7))
    rows.assign([store.acquire(n) if n else None for n in names])
    with torch.no_grad():
        served = model(input_ids=ids).logits
    for name in set(names):
        index = torch.tensor([row for row, n in enumerate(names) if n == name])
        expected = logits(load_model(base, adapters / name if name else None), ids[index])
        torch.testing.assert_close(served[index], expected, atol=2e-5, rtol=1e-5, msg=f"adapter {name}")
    # the adapters really change the output (so the comparison above could fail)
    plain = logits(load_model(base), ids[:1])
    assert (served[0] - plain[0]).abs().max() > 1e-2


def test_conv1d_base_gpt2(gpt2_dir, tmp_path):
    """Conv1D layers (GPT-2) with a MoRA and a LoRA adapter in one batch."""
    configs = {"mora": moraft.MoraConfig(r=4, compression="rotation", target_modules=["c_attn", "c_proj", "c_fc"]),
               "lora": LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)}
    for name, config in configs.items():
        save_adapter(load_model(gpt2_dir), config, tmp_path / "ad" / name)
    model = load_model(gpt2_dir)
    rows, shapes = wrap_model(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, ServedLinear)
    store = AdapterStore(tmp_path / "ad", shapes, torch.device("cpu"), 2**30, base_config=model.config)
    ids = input_ids(rows=3, length=5)
    rows.assign([store.acquire("mora"), store.acquire("lora"), None])
    served = logits(model, ids)
    for row, name in enumerate(["mora", "lora", None]):
        reference = load_model(gpt2_dir, tmp_path / "ad" / name if name else None)
        expected = logits(reference, ids[row : row + 1])
        torch.testing.assert_close(served[row : row + 1], expected, atol=2e-5, rtol=1e-5)


# -- the adapter store ----------------------------------------------------------------------------------------------


def test_store_lru_eviction_pins_and_bound(env):
    base, adapters = env
    _, _, probe = served_model(base, adapters)
    sizes = {n: load_adapter(n, adapters / n, probe.modules, torch.device("cpu"), probe.base_config).nbytes
             for n in ADAPTERS}
    a, b, c = "sharing", "rotation", "lora"
    bound = sizes[a] + sizes[b] + min(sizes.values()) // 2  # two fit, never three
    _, _, store = served_model(base, adapters, max_bytes=bound)
    for name in (a, b):
        store.release(store.acquire(name))
    assert store.resident() == [a, b]
    store.release(store.acquire(a))  # a is now the most recently used
    held = store.acquire(c)  # evicts b, the least recently used
    assert store.resident() == [a, c] and store.evictions == 1
    assert store.resident_bytes <= bound
    pinned = store.acquire(a)  # order now c, a
    store.wait_timeout = 0.2
    with pytest.raises(AdapterBusy, match="in use fill the adapter memory bound"):
        store.acquire(b)  # a and c are both pinned: nothing can be evicted
    store.release(pinned)
    store.release(held)
    store.release(store.acquire(b))  # evicts c, now the least recently used
    assert store.resident() == [a, b] and store.evictions == 2
    tiny = AdapterStore(adapters, probe.modules, torch.device("cpu"), max_bytes=16, base_config=probe.base_config)
    with pytest.raises(AdapterTooLarge, match="more than the server's adapter memory bound"):
        tiny.acquire(a)


def test_store_discovers_new_adapters_and_reloads_changed_ones(env, tmp_path):
    base, adapters = env
    _, _, probe = served_model(base, adapters)
    store = AdapterStore(tmp_path, probe.modules, torch.device("cpu"), 2**30, base_config=probe.base_config)
    assert store.available() == []
    with pytest.raises(UnknownAdapter):
        store.acquire("late")
    save_served_adapter(base, tmp_path / "late", "sharing", seed=1)
    assert store.available() == ["late"]
    first = store.acquire("late")
    store.release(first)
    assert store.acquire("late") is first  # cached
    store.release(first)
    save_served_adapter(base, tmp_path / "late", "sharing", seed=2)  # re-trained in place
    os.utime(tmp_path / "late" / "adapter_model.safetensors", ns=(1, 1))  # a different stamp even within one tick
    second = store.acquire("late")
    assert second is not first and store.loads == 2
    assert not torch.equal(next(iter(first.modules.values())).m, next(iter(second.modules.values())).m)
    for bad in ("../late", "late/..", ".hidden", ""):
        assert not store.exists(bad)


def test_a_replaced_copy_counts_against_the_bound_until_its_last_request_ends(env, tmp_path):
    base, adapters = env
    _, _, probe = served_model(base, adapters)
    save_served_adapter(base, tmp_path / "a", "sharing", seed=1)
    size = load_adapter("a", tmp_path / "a", probe.modules, torch.device("cpu"), probe.base_config).nbytes
    store = AdapterStore(tmp_path, probe.modules, torch.device("cpu"), max_bytes=2 * size + size // 2,
                         base_config=probe.base_config, wait_timeout=0.2)
    old = store.acquire("a")  # a running request holds the first copy
    save_served_adapter(base, tmp_path / "a", "sharing", seed=2)  # re-trained while it runs
    os.utime(tmp_path / "a" / "adapter_model.safetensors", ns=(1, 1))
    new = store.acquire("a")
    assert new is not old and store.resident_bytes == 2 * size  # both copies are live
    save_served_adapter(base, tmp_path / "b", "sharing", seed=3)
    with pytest.raises(AdapterBusy):  # a third copy would pass the bound: the old one is still in use
        store.acquire("b")
    store.release(old)  # its last request ends
    assert store.resident_bytes == size
    store.release(new)
    store.release(store.acquire("b"))
    assert store.resident_bytes == 2 * size and store.resident() == ["a", "b"]


def test_load_errors_name_the_problem(env, tmp_path):
    base, adapters = env
    _, _, store = served_model(base, adapters)
    modules = store.modules

    def fails(directory: Path, pattern: str) -> None:
        with pytest.raises(AdapterLoadError, match=pattern):
            load_adapter(directory.name, directory, modules, torch.device("cpu"), store.base_config)

    # corrupt weights
    broken = tmp_path / "broken"
    save_served_adapter(base, broken, "rotation", seed=3)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    fails(broken, r"cannot read .*adapter_model\.safetensors")
    # unparsable config
    bad_config = tmp_path / "bad-config"
    save_served_adapter(base, bad_config, "sharing", seed=3)
    (bad_config / "adapter_config.json").write_text("{nope")
    fails(bad_config, r"adapter_config\.json is not valid JSON")
    # a LoRA variant the server cannot apply per row
    dora = tmp_path / "dora"
    save_adapter(load_model(base), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), dora)
    fails(dora, r"moraft serve \(which applies each adapter per request\) cannot apply this adapter exactly: "
                r"use_dora=True \(a LoRA variant")
    # a variant whose lora_A/lora_B look plain, so that only PEFT's field metadata tells it apart (KaSA: ΔW = B·diag·A)
    kasa = tmp_path / "kasa"
    save_adapter(load_model(base), LoraConfig(r=2, target_modules=["q_proj"], kasa_config=KasaConfig()), kasa)
    fails(kasa, r"kasa_config=KasaConfig\(.*a LoRA variant")
    # modules_to_save
    mts = tmp_path / "mts"
    save_adapter(load_model(base), moraft.MoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                 mts)
    fails(mts, "cannot apply per request")
    # trained on another base: a module this base lacks
    other = tmp_path / "other"
    save_served_adapter(base, other, "lora", seed=3)
    config = json.loads((other / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    state = {k.replace("layers.1.", "layers.7."): v for k, v in load_file(other / "adapter_model.safetensors").items()}
    save_file(state, other / "adapter_model.safetensors")
    (other / "adapter_config.json").write_text(json.dumps(config))
    fails(other, "model.layers.1.* the adapter does not fit the base model")
    # wrong shapes
    wrong = tmp_path / "wrong"
    save_served_adapter(base, wrong, "lora", seed=3)
    state = load_file(wrong / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], 3)
    save_file(state, wrong / "adapter_model.safetensors")
    fails(wrong, r"has shape \(4, 3\), but on this base model .* the adapter config gives \(4, 128\)")
    # no weights at all
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text((adapters / "lora" / "adapter_config.json").read_text())
    fails(empty, "has no adapter_model")


# -- sampling and text ----------------------------------------------------------------------------------------------


def test_text_tracker_stop_strings_hold_back_partial_matches():
    tok = char_tokenizer()
    tracker = TextTracker(tok, ["END", "xy"])
    pieces = []
    for ch in "abcEN":
        tracker.add(tok.convert_tokens_to_ids(ch))
        pieces.append(tracker.take())
    assert "".join(pieces) == "abc"  # "EN" may begin "END": held back
    tracker.add(tok.convert_tokens_to_ids("X"))
    assert tracker.take() == "ENX" and not tracker.stopped
    for ch in "1EN":
        tracker.add(tok.convert_tokens_to_ids(ch))
    tracker.add(tok.convert_tokens_to_ids("D"))
    assert tracker.stopped and tracker.text == "abcENX1"
    assert tracker.take(final=True) == "1"


def test_sampling_greedy_seeded_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    greedy = SamplingParams(temperature=0)
    seeded = SamplingParams(temperature=1.0, seed=7)
    nucleus = SamplingParams(temperature=1.0, top_p=1e-6, seed=3)  # only the most likely token survives
    rows = [greedy, seeded, nucleus]
    first = sample(logits, rows, [p.generator(torch.device("cpu")) for p in rows])
    again = sample(logits, rows, [p.generator(torch.device("cpu")) for p in rows])
    assert first == again
    assert first[0] == int(logits[0].argmax()) and first[2] == int(logits[2].argmax())
    draws = {tuple(sample(logits[1:2].repeat(1, 1), [SamplingParams(temperature=2.0)],
                          [SamplingParams(temperature=2.0).generator(torch.device("cpu"))])) for _ in range(20)}
    assert len(draws) > 1  # unseeded sampling varies


# -- the engine's KV cache as rows join and leave -------------------------------------------------------------------


def test_engine_logits_equal_full_recompute_while_rows_join_and_leave(env):
    """Drive the engine step by step: rows of different prompt lengths and adapters join a running batch (shorter
    and longer than its cache) and leave it; every row's logits at every step equal a no-cache forward of that row's
    whole sequence with PEFT."""
    from moraft.serve.engine import Engine, Request
    from moraft.serve.metrics import ServeMetrics

    base, adapters = env
    model, tokenizer = load_causal_lm(base)
    rows, shapes = wrap_model(model)
    store = AdapterStore(adapters, shapes, torch.device("cpu"), 2**30, base_config=model.config)
    engine = Engine(model, tokenizer, rows, store.release, ServeMetrics(), context_length=128)
    seen: dict[int, list[torch.Tensor]] = {}
    forward = engine._forward

    def recording_forward(ids, mask, positions, cache, row_adapters):
        logits = forward(ids, mask, positions, cache, row_adapters)
        for row, seq_id in enumerate(current):
            seen.setdefault(seq_id, []).append(logits[row].clone())
        return logits

    engine._forward = recording_forward
    torch.manual_seed(1)
    plan = [("rotation", 9, 12), ("lora", 3, 4), ("sharing", 20, 6), (None, 2, 7), ("truncation", 30, 5)]
    requests = []
    for name, prompt_len, n in plan:
        prompt = torch.randint(4, 100, (prompt_len,)).tolist()
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        requests.append(Request(prompt, params, store.acquire(name) if name else None, lambda e: None))
    with torch.inference_mode():
        current = [r.id for r in requests[:2]]
        engine._admit(requests[:2])
        for step in range(30):  # bounded: the longest request needs 11 decoding steps
            if step == 2:  # a longer and a shorter prompt join the running batch
                current = [r.id for r in requests[2:4]]
                engine._admit(requests[2:4])
            if step == 5:  # the longest prompt joins after the 3-token row has left
                current = [requests[4].id]
                engine._admit(requests[4:])
            current = [s.request.id for s in engine._rows]
            if current:
                engine._decode()
    assert not engine._rows and all(r.done for r in requests)
    for (name, _, n), request in zip(plan, requests):
        steps = seen[request.id]
        assert len(steps) == n, name
        tokens = [int(l.argmax()) for l in steps]
        reference_model = load_model(base, adapters / name if name else None)
        full = logits(reference_model, torch.tensor([request.prompt_ids + tokens]))[0]
        expected = full[len(request.prompt_ids) - 1 : len(request.prompt_ids) - 1 + n]
        torch.testing.assert_close(torch.stack(steps), expected, atol=5e-5, rtol=1e-5, msg=f"adapter {name}")


@pytest.mark.parametrize("compression", moraft.COMPRESSIONS)
@pytest.mark.parametrize("k,d", [(64, 64), (96, 40), (40, 96)])
def test_rotate_blocks_is_the_rotation_block_weights_fold_into_m(compression, k, d):
    """The identity the served layers rely on: block_weights(M) applied to z == M applied to rotate_blocks(z)."""
    from moraft.mora.operators import MoraOperator, block_matmul

    op = MoraOperator(k, d, 16, compression=compression)
    torch.manual_seed(0)
    z, m = op.compress(torch.randn(3, 5, k)), torch.randn(16, 16)
    torch.testing.assert_close(op.rotate_blocks(z) @ m.T, block_matmul(z, op.block_weights(m)), atol=1e-5, rtol=1e-5)


def test_engine_survives_a_failing_forward(env):
    """A forward that raises fails the requests in that step (with a message) and the next request is served."""
    import threading

    from moraft.serve.engine import Engine, Failed, Finished, Request
    from moraft.serve.metrics import ServeMetrics

    base, adapters = env
    model, tokenizer = load_causal_lm(base)
    rows, shapes = wrap_model(model)
    store = AdapterStore(adapters, shapes, torch.device("cpu"), 2**30, base_config=model.config)
    engine = Engine(model, tokenizer, rows, store.release, ServeMetrics(), context_length=128).start()
    forward, calls = engine._forward, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return forward(*args)

    engine._forward = flaky
    try:
        outcomes = []
        for _ in range(2):
            done = threading.Event()

            def on_event(event, done=done):
                if isinstance(event, (Failed, Finished)):
                    outcomes.append(event)
                    done.set()

            engine.submit(Request([1, 5, 6], SamplingParams(max_tokens=3, temperature=0), store.acquire("lora"),
                                  on_event))
            assert done.wait(30)
        assert isinstance(outcomes[0], Failed) and "out of memory (simulated)" in outcomes[0].message
        assert isinstance(outcomes[1], Finished) and outcomes[1].completion_tokens == 3
        assert store.in_use() == [] and engine.alive
    finally:
        engine.stop()
