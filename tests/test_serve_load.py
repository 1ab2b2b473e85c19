"""The serve load test: 32 clients for 20 s against a real ``moraft serve`` (uvicorn on a loopback port, in a
thread), good requests mixed with every kind of bad one and with clients that hang up. Every good request must be
answered with its completion, every bad one with its own 4xx (or, for a broken adapter, that adapter's 500), and
nothing else may fail. Selected by ``-m load``; part of the default suite."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from helpers import LiveServer, metric, one_torch_thread, save_served_adapters_with_faults

from moraft.adapters import load_causal_lm
from moraft.serve import api
from moraft.serve.server import build_server

CLIENTS = 32  # more than SCENARIOS: each client starts with one of them, so every one is tried
SECONDS = 20.0
KEY = "sk-load-test"
LIMIT_BYTES = 2**20  # above the stop-list and deep-nesting poison bodies
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Tally:
    """What the clients saw: per scenario, the statuses; and every answer that was not what it should be."""

    statuses: dict[str, Counter] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)

    def record(self, scenario: str, status: int | str, expected: set, detail: str = "") -> None:
        self.statuses.setdefault(scenario, Counter())[status] += 1
        if status not in expected:
            self.wrong.append(f"{scenario}: {status} {detail[:300]}")


def good_body(rng: random.Random) -> dict:
    """A valid completion request (the tiny temperatures and top_p are valid values too) that decodes
    ``max_tokens`` tokens whatever it samples."""
    sampling = rng.choice([{"temperature": 0}, {"temperature": 0.8, "seed": rng.randrange(2**63)},
                           {"temperature": 1e-45}, {"temperature": 1.0, "top_p": 1e-300}, {"top_p": 0.9}])
    return {"model": rng.choice(["share", "lora", "tiny-base"]), "prompt": rng.choice(["The cat", "Once upon", "ab"]),
            "max_tokens": rng.randint(2, 10), "ignore_eos": True, "stop": ["\x00never"], **sampling}


async def good(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    body = good_body(rng)
    r = await client.post("/v1/completions", json=body)
    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == body["max_tokens"]
    tally.record("good", 200 if ok else r.status_code, {200}, r.text)


async def good_chat(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    body = {**good_body(rng), "messages": [{"role": "user", "content": "Hi there"}]}
    r = await client.post("/v1/chat/completions", json=body)
    ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    tally.record("good chat", 200 if ok else r.status_code, {200}, r.text)


async def good_stream(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    body = {**good_body(rng), "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    finished = [json.loads(line[6:]) for line in lines[:-1]]
    ok = r.status_code == 200 and lines[-1] == "data: [DONE]" and finished[-1]["usage"]["completion_tokens"] == \
        body["max_tokens"]
    tally.record("good stream", 200 if ok else r.status_code, {200}, "\n".join(lines[-2:]))


async def hang_up_streaming(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    body = {**good_body(rng), "max_tokens": 100, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    tally.record("hang up (stream)", r.status_code, {200}, "")


async def hang_up_waiting(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    body = {**good_body(rng), "max_tokens": 100}
    try:
        r = await client.post("/v1/completions", json=body, timeout=httpx.Timeout(10, read=rng.uniform(0.01, 0.2)))
        tally.record("hang up (plain)", r.status_code, {200}, r.text)  # it was fast enough
    except httpx.ReadTimeout:
        tally.record("hang up (plain)", "gone", {"gone"})


def poison(name: str, status: int, change, path: str = "/v1/completions", headers: dict | None = None):
    """A bad request: ``change`` turns a good body into raw bytes or a dict; the answer must be ``status``."""

    async def send(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
        body = change(good_body(rng))
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent = {**AUTH, "content-type": "application/json", **(headers or {})}
        r = await client.post(path, content=content, headers=sent)
        tally.record(name, r.status_code, {status}, r.text)

    return send


def raw(template: str):
    return lambda body: template.encode()


SCENARIOS = [
    (good, 30), (good_chat, 8), (good_stream, 12), (hang_up_streaming, 4), (hang_up_waiting, 4),
    (poison("seed past 64 bits", 400, lambda b: {**b, "seed": 2**64}), 2),
    (poison("negative seed past 64 bits", 400, lambda b: {**b, "seed": -(2**63) - 1}), 2),
    (poison("temperature NaN", 400, raw('{"model": "share", "prompt": "x", "temperature": NaN}')), 1),
    (poison("too many stop strings", 400, lambda b: {**b, "stop": ["s" * 200] * 3000}), 2),
    (poison("a long stop string", 400, lambda b: {**b, "stop": "s" * (api.MAX_STOP_LENGTH + 1)}), 1),
    (poison("a body over the limit", 413, lambda b: {**b, "prompt": "p" * LIMIT_BYTES}), 2),
    (poison("a prompt over the character limit", 400, lambda b: {**b, "prompt": "q" * (32 * 128 + 1)}), 2),
    (poison("a lone surrogate", 400, raw('{"model": "share", "prompt": "a\\ud800"}')), 2),
    (poison("a lone surrogate in chat", 400, raw('{"model": "share", "messages": [{"role": "user", "content": '
                                                 '"\\udc00"}]}'), path="/v1/chat/completions"), 1),
    (poison("a 10,000-character model", 404, lambda b: {**b, "model": "m" * 10_000}), 2),
    (poison("deep nesting", 400, raw('{"model": "share", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}")), 1),
    (poison("no API key", 401, lambda b: b, headers={"Authorization": ""}), 2),
    (poison("a wrong API key", 401, lambda b: b, headers={"Authorization": "Bearer nope"}), 1),
    (poison("an adapter with NaN weights", 500, lambda b: {**b, "model": "nan"}), 2),
    (poison("an adapter whose config was edited", 500, lambda b: {**b, "model": "edited"}), 1),
]


async def client_loop(url: str, seed: int, deadline: float, tally: Tally) -> None:
    """Scenario ``seed`` first (so that the clients together try every one), then scenarios drawn by weight."""
    rng = random.Random(seed)
    actions, weights = zip(*SCENARIOS)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
        await actions[seed % len(actions)](client, rng, tally)
        while time.monotonic() < deadline:
            await rng.choices(actions, weights)[0](client, rng, tally)


@pytest.fixture(scope="module")
def server(serve_base, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("serve-load-adapters")
    save_served_adapters_with_faults(serve_base, adapters, nan_kind="rotation")
    model, tokenizer = load_causal_lm(serve_base)
    moraft = build_server(model, tokenizer, adapters, base_name="tiny-base", api_key=KEY,
                          max_request_mb=LIMIT_BYTES / 2**20)
    with one_torch_thread(), LiveServer(moraft.app) as live:
        live.moraft = moraft
        yield live
    moraft.close()


@pytest.mark.load
def test_32_clients_with_poison_and_hang_ups_fail_nothing_good(server):
    tally = Tally()

    async def run() -> None:
        deadline = time.monotonic() + SECONDS
        await asyncio.gather(*(client_loop(server.url, seed, deadline, tally) for seed in range(CLIENTS)))

    asyncio.run(run())
    answered = {name: sum(c.values()) for name, c in tally.statuses.items()}
    assert not tally.wrong, f"{len(tally.wrong)} wrong answers, e.g. {tally.wrong[:5]}; all: {tally.statuses}"
    assert len(answered) == len(SCENARIOS) and answered["good"] > CLIENTS, tally.statuses
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        assert client.get("/health").json() == {"status": "ok"}
        deadline = time.monotonic() + 10  # hung-up requests leave the batch at its next step
        while metric(client, "moraft_running_requests") or server.moraft.store.in_use():
            assert time.monotonic() < deadline, "requests of clients that left are still running"
            time.sleep(0.05)
        assert metric(client, 'moraft_finished_requests_total{reason="cancelled"}') > 0
