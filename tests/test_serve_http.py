"""moraft serve over real HTTP: uvicorn on a loopback port, a tiny LLaMA base and three adapters (MoRA sharing,
MoRA rotation, PEFT LoRA) with random non-zero weights. Responses are checked against offline greedy generation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers import LiveServer, error_of, free_socket, metric, reference, save_served_adapter

from moraft.adapters import load_causal_lm
from moraft.serve.adapters import load_adapter
from moraft.serve.server import build_server

CONTEXT = 128  # the serve_base fixture's
ADAPTERS = {"share": "sharing", "rot": "rotation", "lora": "lora"}


@pytest.fixture(scope="module")
def env(serve_base, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("serve-http-adapters")
    for seed, (name, kind) in enumerate(ADAPTERS.items()):
        save_served_adapter(serve_base, adapters / name, kind, seed=seed + 1)
    return serve_base, adapters


@pytest.fixture(scope="module")
def live(env):
    base, adapters = env
    model, tokenizer = load_causal_lm(base)
    # a batching window so that requests sent together start decoding in the same step
    server = build_server(model, tokenizer, adapters, base_name="tiny-base", batch_window_ms=300)
    with LiveServer(server.app) as live:
        live.tokenizer, live.moraft = tokenizer, server
        with httpx.Client(base_url=live.url, timeout=60) as client:
            live.client = client
            yield live
    server.close()


def expected_ids(env, model: str, prompt_ids: list[int], n: int, ignore_eos: bool = False) -> list[int]:
    base, adapters = env
    return reference(base, None if model == "tiny-base" else adapters / model, prompt_ids, n, ignore_eos=ignore_eos)


def expected_text(env, tokenizer, model: str, prompt_ids: list[int], n: int, ignore_eos: bool = False) -> str:
    return tokenizer.decode(expected_ids(env, model, prompt_ids, n, ignore_eos), skip_special_tokens=True)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# -- correctness and batching ---------------------------------------------------------------------------------------


def test_models_lists_base_and_every_adapter(live):
    r = live.client.get("/v1/models")
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids[0] == "tiny-base" and set(ids[1:]) == {"share", "rot", "lora"}
    assert all(m["object"] == "model" for m in r.json()["data"])
    assert live.client.get("/v1/models/rot").json()["parent"] == "tiny-base"
    assert live.client.get("/v1/models/nope").status_code == 404


def test_concurrent_requests_for_different_adapters_match_offline_and_share_a_batch(live, env):
    """Four requests (three adapters and the base) sent together: each equals PEFT's greedy generation, and one
    decoding step held all four models."""
    tok = live.tokenizer
    prompt = "The cat sat on"
    ids = tok(prompt)["input_ids"]
    models = [*ADAPTERS, "tiny-base"]
    generated = {m: expected_ids(env, m, ids, 24) for m in models}
    expected = {m: tok.decode(g, skip_special_tokens=True) for m, g in generated.items()}
    assert len(set(expected.values())) == 4  # the adapters really differ

    before = metric(live.client, "moraft_batch_adapters_max")

    def complete(model: str) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        return live.client.post("/v1/completions", json=body).json()

    with ThreadPoolExecutor(len(models)) as pool:
        answers = dict(zip(models, pool.map(complete, models)))
    for model, answer in answers.items():
        assert answer["object"] == "text_completion" and answer["model"] == model
        assert answer["choices"][0]["text"] == expected[model], model
        # every token generated counts, the EOS that stopped it and special tokens that leave no text too
        n = len(generated[model])
        finish = "stop" if generated[model][-1] == tok.eos_token_id else "length"
        assert answer["choices"][0]["finish_reason"] == finish
        assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
    assert before <= metric(live.client, "moraft_batch_adapters_max") >= 4


def test_chat_completion_matches_offline(live, env):
    tok = live.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    r = live.client.post("/v1/chat/completions", json={"model": "rot", "messages": messages, "max_tokens": 20,
                                                       "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": expected_text(env, tok, "rot", prompt_ids, 20)}
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)


def test_request_joins_a_running_batch_and_leaves_first(live, env):
    """Continuous batching: a short request sent while a long one streams joins the running batch between steps,
    finishes first, and both still equal offline generation (the KV caches of different lengths were merged)."""
    tok = live.tokenizer
    long_prompt, short_prompt = "Once upon a time there was", "Hey"
    long_ids, short_ids = tok(long_prompt)["input_ids"], tok(short_prompt)["input_ids"]
    n_long = CONTEXT - len(long_ids)
    long_expected = expected_text(env, tok, "share", long_ids, n_long, ignore_eos=True)
    short_expected = expected_text(env, tok, "lora", short_ids, 8, ignore_eos=True)
    got_first_chunk, short_done_at, stream_text = threading.Event(), [], []

    def stream_long() -> float:
        body = {"model": "share", "prompt": long_prompt, "max_tokens": n_long, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with live.client.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stream_text.append(json.loads(line[6:])["choices"][0]["text"])
                    got_first_chunk.set()
        return time.monotonic()

    with ThreadPoolExecutor(1) as pool:
        long_done = pool.submit(stream_long)
        assert got_first_chunk.wait(30)
        r = live.client.post("/v1/completions", json={"model": "lora", "prompt": short_prompt, "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True})
        short_done_at.append(time.monotonic())
        long_finished_at = long_done.result()
    assert r.json()["choices"][0]["text"] == short_expected
    assert "".join(stream_text) == long_expected
    assert short_done_at[0] < long_finished_at
    assert metric(live.client, "moraft_batch_adapters_max") >= 2


def test_streaming_chat_and_completion(live, env):
    tok = live.tokenizer
    messages = [{"role": "user", "content": "Tell me"}]
    body = {"model": "lora", "messages": messages, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with live.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    prompt_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    assert text == expected_text(env, tok, "lora", prompt_ids, 12)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["usage"]["prompt_tokens"] == len(prompt_ids)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == finish[0]["usage"]  # include_usage

    body = {"model": "share", "prompt": "abc", "max_tokens": 10, "temperature": 0, "stream": True}
    with live.client.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r)
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    plain = live.client.post("/v1/completions", json={**body, "stream": False}).json()
    assert streamed == plain["choices"][0]["text"]
    assert events[-2]["usage"] == plain["usage"]


def test_sampling_options(live, env):
    tok = live.tokenizer
    c = live.client
    # stop strings: the text ends before the first stop string; finish_reason "stop"
    full = c.post("/v1/completions", json={"model": "rot", "prompt": "xyz", "max_tokens": 20, "temperature": 0,
                                           "ignore_eos": True}).json()["choices"][0]["text"]
    assert len(full) >= 6
    stop = full[3:5]
    cut = c.post("/v1/completions", json={"model": "rot", "prompt": "xyz", "max_tokens": 20, "temperature": 0,
                                          "ignore_eos": True, "stop": [stop, "never"]}).json()
    assert cut["choices"][0]["text"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    # max_tokens: finish_reason "length"
    short = c.post("/v1/completions", json={"model": "rot", "prompt": "xyz", "max_tokens": 3, "temperature": 0,
                                            "ignore_eos": True}).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
    # seed: same seed, same sample (whatever shares the batch); temperature/top_p are honoured
    body = {"model": "share", "prompt": "abc", "max_tokens": 16, "temperature": 1.5, "top_p": 0.9, "seed": 11,
            "ignore_eos": True}
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda b: c.post("/v1/completions", json=b).json()["choices"][0]["text"],
                              [body, body, {**body, "seed": 12}]))
    assert texts[0] == texts[1] != texts[2]
    # a prompt given as token ids is the same prompt
    as_ids = c.post("/v1/completions", json={"model": "rot", "prompt": tok("xyz")["input_ids"], "max_tokens": 20,
                                             "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"]
    assert as_ids == full
    nucleus = c.post("/v1/completions", json={**body, "top_p": 1e-6}).json()["choices"][0]["text"]
    greedy = c.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    assert nucleus == greedy  # top_p that keeps one token is greedy


def test_client_disconnect_cancels_its_request(live):
    """A client that goes away mid-stream frees its batch row and its adapter."""
    before = metric(live.client, 'moraft_finished_requests_total{reason="cancelled"}', 0)
    body = {"model": "rot", "prompt": "abc", "max_tokens": CONTEXT - 5, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=live.url, timeout=60) as other:
        with other.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one chunk, then hang up
    deadline = time.monotonic() + 30
    while metric(live.client, 'moraft_finished_requests_total{reason="cancelled"}', 0) < before + 1:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.05)
    assert live.moraft.store.in_use() == []


# -- adapters come and go ------------------------------------------------------------------------------------------


def test_adapter_added_while_running_is_served_without_restart(live, env):
    base, adapters = env
    tok = live.tokenizer
    new = adapters / "late-rot"
    try:
        save_served_adapter(base, new, "rotation", seed=42)
        assert "late-rot" in [m["id"] for m in live.client.get("/v1/models").json()["data"]]
        ids = tok("Hello")["input_ids"]
        r = live.client.post("/v1/completions", json={"model": "late-rot", "prompt": "Hello", "max_tokens": 10,
                                                      "temperature": 0})
        assert r.json()["choices"][0]["text"] == expected_text(env, tok, "late-rot", ids, 10)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def test_eviction_under_a_small_memory_bound(env):
    """Two of the three adapters fit: serving all three evicts the least recently used, and an evicted adapter is
    reloaded (and still correct) when asked for again."""
    base, adapters = env
    model, tokenizer = load_causal_lm(base)
    sizes = {}
    server = build_server(model, tokenizer, adapters, base_name="tiny-base", max_adapter_memory_mb=1.0)
    for name in ADAPTERS:
        sizes[name] = load_adapter(name, adapters / name, server.store.modules, "cpu", model.config).nbytes
    server.close()
    bound = sorted(sizes.values())[-1] + sorted(sizes.values())[-2] + min(sizes.values()) // 2
    model, tokenizer = load_causal_lm(base)
    server = build_server(model, tokenizer, adapters, base_name="tiny-base", max_adapter_memory_mb=bound / 2**20)
    try:
        with LiveServer(server.app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
            ids = tokenizer("Hi")["input_ids"]
            texts = {}
            for name in ["share", "rot", "lora", "share"]:
                r = client.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 8,
                                                         "temperature": 0})
                assert r.status_code == 200, r.text
                texts.setdefault(name, []).append(r.json()["choices"][0]["text"])
                assert metric(client, "moraft_adapter_memory_bytes") <= bound
            assert metric(client, "moraft_adapter_evictions_total") >= 2
            assert metric(client, "moraft_adapter_loads_total") == 4  # "share" was loaded twice
            assert server.store.resident() == ["lora", "share"]
            assert texts["share"][0] == texts["share"][1] == expected_text(env, tokenizer, "share", ids, 8)
    finally:
        server.close()


# -- errors --------------------------------------------------------------------------------------------------------


def test_errors(live, env):
    c = live.client
    # unknown adapter: 404 listing what exists
    e = error_of(c.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404)
    assert e["code"] == "model_not_found" and "'nope'" in e["message"]
    for name in ("tiny-base", "share", "rot", "lora"):
        assert name in e["message"]
    assert error_of(c.post("/v1/completions", json={"model": "../adapters/share", "prompt": "hi"}), 404)
    # prompt longer than the context: 400 (completions and chat)
    e = error_of(c.post("/v1/completions", json={"model": "share", "prompt": "x" * (CONTEXT + 5)}), 400)
    assert e["code"] == "context_length_exceeded" and str(CONTEXT) in e["message"]
    e = error_of(c.post("/v1/chat/completions", json={"model": "share", "messages": [
        {"role": "user", "content": "y" * CONTEXT}]}), 400)
    assert e["code"] == "context_length_exceeded"
    e = error_of(c.post("/v1/completions", json={"model": "share", "prompt": "hi", "max_tokens": CONTEXT}), 400)
    assert e["param"] == "max_tokens" and "at most" in e["message"]
    # malformed JSON, wrong body type, bad fields: 400
    e = error_of(c.post("/v1/completions", content=b'{"model": "share", "prompt": ', headers={
        "content-type": "application/json"}), 400)
    assert e["code"] == "invalid_json"
    error_of(c.post("/v1/completions", content=b"[1, 2]"), 400)
    e = error_of(c.post("/v1/completions", json={"model": "share", "prompt": "hi", "temperature": -1}), 400)
    assert e["param"] == "temperature"
    e = error_of(c.post("/v1/completions", json={"model": "share"}), 400)
    assert e["param"] == "prompt"
    error_of(c.post("/v1/chat/completions", json={"model": "share", "messages": []}), 400)
    e = error_of(c.post("/v1/completions", json={"model": "share", "prompt": "hi", "n": 2}), 400)
    assert e["param"] == "n"
    error_of(c.post("/v1/completions", json={"model": "share", "prompt": [5, 10**6]}), 400)
    # unknown route: OpenAI-style 404 too
    error_of(c.get("/v1/nothing"), 404)
    # everything above left the server healthy
    assert c.get("/health").json() == {"status": "ok"}


def test_broken_adapter_fails_only_its_requests(live, env):
    base, adapters = env
    broken = adapters / "broken"
    try:
        save_served_adapter(base, broken, "sharing", seed=5)
        (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage")
        e = error_of(live.client.post("/v1/completions", json={"model": "broken", "prompt": "hi"}), 500)
        assert e["code"] == "adapter_load_failed" and "broken" in e["message"]
        with live.client.stream("POST", "/v1/chat/completions", json={
                "model": "broken", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            assert r.status_code == 500
        ok = live.client.post("/v1/completions", json={"model": "share", "prompt": "hi", "max_tokens": 4})
        assert ok.status_code == 200
        assert live.client.get("/health").status_code == 200
        assert metric(live.client, "moraft_adapter_load_failures_total") >= 2
    finally:
        shutil.rmtree(broken, ignore_errors=True)


def test_health_and_metrics(live):
    c = live.client
    assert c.post("/v1/completions", json={"model": "share", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert c.get("/health").json() == {"status": "ok"}
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("moraft_requests_total", "moraft_prompt_tokens_total", "moraft_generation_tokens_total",
                 "moraft_batch_size_bucket", "moraft_batch_adapters_max", "moraft_request_latency_seconds_sum",
                 "moraft_time_to_first_token_seconds_count", "moraft_adapters_loaded", "moraft_adapter_memory_bytes"):
        assert name in text, name
    assert 'moraft_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert metric(c, "moraft_generation_tokens_total") > 0


# -- the command line ----------------------------------------------------------------------------------------------


def test_moraft_serve_command(env, tmp_path, capsys):
    """`moraft serve --base --adapters` starts a server that answers; bad arguments exit 2 with one line."""
    base, adapters = env
    src = str(Path(__file__).resolve().parents[1] / "src")
    environ = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "moraft.cli", "serve", "--base", str(base), "--adapters", str(adapters),
           "--port", str(port), "--log_level", "warning"]
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "moraft serve did not start"
            time.sleep(0.25)
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models[0] == "base" and "rot" in models
        r = httpx.post(url + "/v1/completions", json={"model": "rot", "prompt": "Hi", "max_tokens": 5,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(30)
    from moraft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--base", str(base), "--adapters", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "moraft serve: error: --adapters" in err and "does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["serve", "--base", str(base), "--adapters", str(adapters), "--max_batch_size", "0"])
    assert "--max_batch_size=0 is invalid" in capsys.readouterr().err
