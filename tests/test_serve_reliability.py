"""One client's bad request, input or disconnect never hurts another's (issue 25): moraft serve over real HTTP
(uvicorn on a loopback port, the tiny LLaMA base) with poison values, oversized bodies, invalid text, broken
adapters, slow tokenizing, disconnects and API keys. The load test, with all of these at once, is
tests/test_serve_load.py."""

from __future__ import annotations

import asyncio
import json
import random
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import LiveServer, error_of, metric, one_torch_thread, save_served_adapters_with_faults

from moraft.adapters import load_causal_lm
from moraft.errors import UserError
from moraft.interop import load_adapter_on_meta
from moraft.serve import api
from moraft.serve.sampling import SamplingParams, TextTracker
from moraft.serve.server import build_server, serve
from moraft.testing import char_tokenizer

CONTEXT = 128  # the serve_base fixture's
CANCELLED = 'moraft_finished_requests_total{reason="cancelled"}'


@pytest.fixture(scope="module")
def env(serve_base, tmp_path_factory):
    """The base and a folder of adapters: two good ones, one whose weights are NaN (a diverged run) and one whose
    adapter_config.json says r=2 for weights trained with r=4."""
    adapters = tmp_path_factory.mktemp("serve-reliability-adapters")
    save_served_adapters_with_faults(serve_base, adapters)
    return serve_base, adapters


@pytest.fixture(scope="module")
def live(env):
    """A server with only the options that existed before issue 25, and a batching window so that requests sent
    together share decoding steps."""
    base, adapters = env
    model, tokenizer = load_causal_lm(base)
    server = build_server(model, tokenizer, adapters, base_name="tiny-base", batch_window_ms=100)
    with one_torch_thread(), LiveServer(server.app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        live.client, live.moraft = client, server
        yield live
    server.close()


def complete(client: httpx.Client, **fields) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "share", "prompt": "The cat", "max_tokens": 6, **fields})


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# -- 1. sampling values ---------------------------------------------------------------------------------------------

POISON = [{"temperature": 1e-45}, {"temperature": 1e-300}, {"top_p": 1e-300, "temperature": 1.0},
          {"seed": 2**64, "temperature": 1.0}, {"seed": -(2**63) - 1, "temperature": 1.0}]


def test_out_of_range_sampling_values_are_a_400_naming_the_field(live):
    c = live.client
    for field, value in [("seed", 2**64), ("seed", -(2**63) - 1), ("temperature", 2.5), ("top_p", 0)]:
        e = error_of(complete(c, **{field: value}), 400)
        assert e["param"] == field and field in e["message"], e
    for raw, field in [(b'"temperature": NaN', "temperature"), (b'"top_p": Infinity', "top_p")]:
        body = b'{"model": "share", "prompt": "hi", ' + raw + b"}"
        e = error_of(c.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 400)
        assert raw.split(b": ")[1].decode() in e["message"], e  # NaN and Infinity are not JSON
    for seed in (2**63 - 1, -(2**63)):  # the signed 64-bit range itself is accepted
        assert text_of(complete(c, seed=seed, temperature=1.0))


def test_tiny_temperature_and_top_p_sample_as_vllm_does_never_nan(live):
    """0 < temperature < 0.01 is raised to 0.01 (vLLM's _MAX_TEMP); top_p below float32's range keeps the most likely
    token, so it is greedy."""
    c = live.client
    floor = text_of(complete(c, temperature=0.01, seed=5))
    assert text_of(complete(c, temperature=1e-45, seed=5)) == floor
    assert text_of(complete(c, temperature=1e-300, seed=5)) == floor
    greedy = text_of(complete(c, temperature=0))
    assert text_of(complete(c, temperature=1.0, top_p=1e-300, seed=5)) == greedy
    assert SamplingParams(temperature=1e-45).temperature == 0.01


def test_bad_values_never_fail_the_good_requests_decoded_with_them(live):
    """Good requests sent together with every poison value (so that they share prefill and decoding steps) all
    answer, with the text they give alone."""
    c = live.client
    good = {"model": "lora", "prompt": "The cat", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    alone = text_of(c.post("/v1/completions", json=good))
    bodies = [good] * 6 + [{**good, **p} for p in POISON]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: c.post("/v1/completions", json=b), bodies))
    assert [text_of(r) for r in answers[:6]] == [alone] * 6
    assert all(r.status_code in (200, 400) for r in answers[6:]), [r.text for r in answers[6:]]


def test_a_request_whose_logits_are_not_finite_fails_alone(live):
    """Requests for an adapter whose weights are NaN (a diverged run) fail, greedy or sampled, and nothing else does:
    the good requests decoded in the same steps answer with the text they give alone."""
    c = live.client
    good = {"model": "share", "prompt": "Once", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    alone = text_of(c.post("/v1/completions", json=good))
    bad = [{**good, "model": "nan", "temperature": t} for t in (0, 1.0)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: c.post("/v1/completions", json=b), [good] * 4 + bad))
    assert [text_of(r) for r in answers[:4]] == [alone] * 4
    for r in answers[4:]:
        assert "not finite" in error_of(r, 500)["message"]
    assert c.get("/health").json() == {"status": "ok"}


def test_engine_fails_only_the_request_whose_sampling_cannot_start(live):
    """Past the API's checks (a caller of the engine itself): a seed torch refuses fails that request alone."""
    from moraft.serve.engine import Failed, Finished, Request

    engine, tok = live.moraft.engine, live.moraft.state.tokenizer
    events: dict[str, list] = {"good": [], "bad": []}
    done = threading.Semaphore(0)

    def collect(name: str):
        def on_event(event) -> None:
            events[name].append(event)
            if isinstance(event, (Finished, Failed)):
                done.release()
        return on_event

    ids = tok("Hello")["input_ids"]
    engine.submit(Request(ids, SamplingParams(max_tokens=4, temperature=1.0, seed=2**64), None, collect("bad")))
    engine.submit(Request(ids, SamplingParams(max_tokens=4, temperature=0), None, collect("good")))
    assert done.acquire(timeout=30) and done.acquire(timeout=30)
    assert isinstance(events["bad"][-1], Failed)
    assert isinstance(events["good"][-1], Finished) and events["good"][-1].completion_tokens == 4


# -- 5. text and model ids ------------------------------------------------------------------------------------------


def test_lone_surrogates_are_a_400_naming_the_field(live):
    c = live.client

    def post(path: str, body: str) -> dict:
        return error_of(c.post(path, content=body.encode(), headers={"content-type": "application/json"}), 400)

    assert post("/v1/completions", '{"model": "share", "prompt": "a\\ud800b"}')["param"] == "prompt"
    chat = '{"model": "share", "messages": [{"role": "user", "content": "hi \\udfff"}]}'
    assert post("/v1/chat/completions", chat)["param"] == "messages.0.content"
    e = post("/v1/completions", '{"model": "share", "prompt": "hi", "stop": ["ok", "\\ud83d"]}')
    assert e["param"] == "stop.1" and "surrogate" in e["message"]
    assert complete(c, prompt="a \U0001f600 pair").status_code == 200  # "\ud83d\ude00" is one character


def test_unservable_model_ids_are_a_404(live):
    c = live.client
    for name in ("x" * 10_000, "a\x00b", "\u00e9" * 300):
        e = error_of(complete(c, model=name), 404)
        assert e["code"] == "model_not_found" and len(e["message"]) < 1000
    assert error_of(c.get("/v1/models/" + "y" * 5000), 404)["code"] == "model_not_found"


# -- 6. an adapter whose config no longer matches its weights -------------------------------------------------------


def test_adapter_whose_config_was_edited_fails_only_its_requests(live, env):
    """r edited from 4 to 2 in adapter_config.json: moraft merge/export-lora's check refuses it, and so does serve,
    through the same function; other adapters are served meanwhile."""
    base, adapters = env
    with pytest.raises(UserError, match="adapter config gives"):
        load_adapter_on_meta(adapters / "edited", base, "merge")
    e = error_of(complete(live.client, model="edited"), 500)
    assert e["code"] == "adapter_load_failed" and "edited" in e["message"] and "adapter config gives" in e["message"]
    assert text_of(complete(live.client, model="lora"))


# -- 4. stop strings ------------------------------------------------------------------------------------------------


def test_stop_strings_are_bounded_in_number_and_length(live):
    c = live.client
    e = error_of(complete(c, stop=["x"] * (api.MAX_STOP_STRINGS + 1)), 400)
    assert e["param"] == "stop" and f"at most {api.MAX_STOP_STRINGS}" in e["message"]
    e = error_of(complete(c, stop="y" * (api.MAX_STOP_LENGTH + 1)), 400)
    assert e["param"] == "stop" and f"at most {api.MAX_STOP_LENGTH}" in e["message"]
    most = ["".join(random.Random(i).choices("abc", k=api.MAX_STOP_LENGTH)) for i in range(api.MAX_STOP_STRINGS)]
    assert complete(c, stop=most).status_code == 200


def stream_through(tracker: TextTracker, tok, text: str) -> list[str]:
    pieces = []
    for ch in text:
        tracker.add(tok.convert_tokens_to_ids(ch))
        pieces.append(tracker.take())
        if tracker.stopped:
            break
    tracker.flush()
    return pieces + [tracker.take(final=True)]


def held_back(text: str, sent: int, stops: list[str]) -> int:
    """What the tracker must hold back, by the definition: the longest tail of ``text`` (not yet sent) that is a
    proper prefix of a stop string."""
    return max([n for s in stops for n in range(1, min(len(s), len(text) - sent + 1)) if text.endswith(s[:n])],
               default=0)


def until_stop(text: str, stops: list[str]) -> str:
    """The text a generation of ``text`` returns: cut before the first stop string to be completed."""
    for end in range(len(text) + 1):
        found = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if found:
            return text[: min(found)]
    return text


def test_text_tracker_holds_back_exactly_the_tails_that_begin_a_stop_string():
    tok = char_tokenizer()
    rng = random.Random(0)
    for _ in range(200):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choices("abc", k=30))
        tracker = TextTracker(tok, stops)
        sent = ""
        for ch in text:
            tracker.add(tok.convert_tokens_to_ids(ch))
            if tracker.stopped:
                break
            sent += tracker.take()
            assert len(tracker.text) - len(sent) == held_back(tracker.text, len(sent), stops), (stops, tracker.text)
        tracker.flush()
        assert sent + tracker.take(final=True) == until_stop(text, stops)


def test_text_tracker_cost_does_not_grow_with_the_stop_strings():
    """The most stop strings the API takes cost the tracker a small multiple of no stop strings at all (checking every
    prefix of every stop string on each token, as before issue 25, cost an order of magnitude more)."""
    tok = char_tokenizer()
    text = "".join(random.Random(1).choices(string.ascii_lowercase + " ", k=400))
    most = ["".join(random.Random(i).choices(string.ascii_lowercase, k=api.MAX_STOP_LENGTH))
            for i in range(api.MAX_STOP_STRINGS)]  # of the text's letters, so that tails keep being looked up

    def seconds(stops: list[str]) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            stream_through(TextTracker(tok, stops), tok, text)
            best = min(best, time.perf_counter() - start)
        return best

    assert seconds(most) < 8 * seconds([])


# -- 2, 3. limits, tokenizing off the event loop, disconnects -------------------------------------------------------


class SlowTokenizer:
    """The base's tokenizer, slowed: encoding a text that holds "SLOW" takes ``encode_delay`` seconds and every
    decode ``decode_delay`` (so a generation lasts long enough to walk away from)."""

    def __init__(self, tokenizer, encode_delay: float, decode_delay: float) -> None:
        self._tokenizer, self._encode_delay, self._decode_delay = tokenizer, encode_delay, decode_delay

    def __call__(self, text, **kwargs):
        if "SLOW" in text:
            time.sleep(self._encode_delay)
        return self._tokenizer(text, **kwargs)

    def decode(self, ids, **kwargs):
        time.sleep(self._decode_delay)
        return self._tokenizer.decode(ids, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


LIMIT_BYTES = 2**16


@pytest.fixture(scope="module")
def limited(env):
    """A server with a 64 KiB body limit, a 1000-character prompt limit and a slow tokenizer."""
    base, adapters = env
    model, tokenizer = load_causal_lm(base)
    slow = SlowTokenizer(tokenizer, encode_delay=1.5, decode_delay=0.005)
    server = build_server(model, slow, adapters, base_name="tiny-base", max_request_mb=LIMIT_BYTES / 2**20,
                          max_prompt_chars=1000)
    with one_torch_thread(), LiveServer(server.app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        live.client, live.moraft = client, server
        yield live
    server.close()


def test_a_body_over_the_limit_is_a_413_by_its_content_length(limited):
    c = limited.client
    body = json.dumps({"model": "share", "prompt": "x" * LIMIT_BYTES}).encode()
    e = error_of(c.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 413)
    assert e["code"] == "request_too_large" and str(LIMIT_BYTES) in e["message"] and "--max_request_mb" in e["message"]
    assert c.get("/health").json() == {"status": "ok"}


def test_a_chunked_body_over_the_limit_is_refused_before_it_is_all_read(limited):
    """No Content-Length: the body is counted as it arrives and refused once past the limit, unread beyond it."""
    chunk, pulled = 2**12, []

    async def endless():
        for _ in range(10 * LIMIT_BYTES // chunk):
            pulled.append(chunk)
            yield b" " * chunk

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=limited.moraft.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            return await client.post("/v1/completions", content=endless())

    e = error_of(asyncio.run(post()), 413)
    assert "--max_request_mb" in e["message"]
    assert sum(pulled) <= LIMIT_BYTES + chunk


def test_a_prompt_over_the_character_limit_is_a_400_before_tokenizing(limited):
    c = limited.client
    e = error_of(c.post("/v1/completions", json={"model": "share", "prompt": "SLOW" + "x" * 1000}), 400)
    assert e["code"] == "prompt_too_long" and "1000" in e["message"] and "--max_prompt_chars" in e["message"]
    messages = [{"role": "user", "content": "y" * 600}, {"role": "user", "content": "z" * 600}]
    e = error_of(c.post("/v1/chat/completions", json={"model": "share", "messages": messages}), 400)
    assert e["param"] == "messages" and e["code"] == "prompt_too_long"


def test_tokenizing_never_blocks_the_event_loop(limited):
    """While one prompt takes 1.5 s to tokenize, /health and other requests' replies do not wait for it."""
    c = limited.client
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(c.post, "/v1/completions", json={"model": "share", "prompt": "SLOW", "max_tokens": 2})
        time.sleep(0.2)  # it is being tokenized now
        start = time.monotonic()
        assert c.get("/health").status_code == 200
        waited = time.monotonic() - start
        assert not slow.done()
        assert slow.result().status_code == 200
    assert waited < 0.75


def test_a_non_streaming_client_that_disconnects_cancels_its_generation(limited):
    c = limited.client
    before, tokens = metric(c, CANCELLED, 0), metric(c, "moraft_generation_tokens_total", 0)
    body = {"model": "share", "prompt": "Hi", "max_tokens": CONTEXT - 8, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(limited.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
    deadline = time.monotonic() + 10
    while metric(c, CANCELLED, 0) < before + 1:
        assert time.monotonic() < deadline, "the generation went on after its client left"
        time.sleep(0.05)
    assert metric(c, "moraft_generation_tokens_total") - tokens < body["max_tokens"]
    assert limited.moraft.store.in_use() == []


# -- 7. API keys ----------------------------------------------------------------------------------------------------

KEY = "sk-moraft-test"
AUTH_HEADER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(env):
    base, adapters = env
    model, tokenizer = load_causal_lm(base)
    server = build_server(model, tokenizer, adapters, base_name="tiny-base", api_key=KEY)
    with one_torch_thread(), LiveServer(server.app) as live:
        yield live
    server.close()


def test_api_key_is_required_on_v1_as_vllm_and_openai_do(keyed):
    body = {"model": "share", "prompt": "Hi", "max_tokens": 2}
    with httpx.Client(base_url=keyed.url, timeout=60) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": f"Bearer {KEY}x"}):
            r = anonymous.post("/v1/completions", json=body, headers=headers)
            e = error_of(r, 401)
            assert e["code"] == "invalid_api_key" and "Authorization: Bearer" in e["message"]
            assert r.headers["www-authenticate"] == "Bearer"
        error_of(anonymous.get("/v1/models"), 401)
        # what vLLM leaves open stays open
        assert anonymous.get("/health").json() == {"status": "ok"}
        assert 'status="401"' in anonymous.get("/metrics").text
    with httpx.Client(base_url=keyed.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        assert client.get("/v1/models").status_code == 200
        assert text_of(client.post("/v1/completions", json=body)) is not None


def test_api_key_is_required_where_the_app_is_mounted_too(keyed):
    """Mounted under a prefix (scope["path"] /serve/v1/..., root_path /serve), /v1 still needs the key."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    outer = Starlette(routes=[Mount("/serve", app=keyed.server.config.app)])

    async def statuses() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://serve") as client:
            return [(await client.get("/serve/v1/models", headers=h)).status_code for h in ({}, AUTH_HEADER)]

    assert asyncio.run(statuses()) == [401, 200]


def test_moraft_serve_reads_the_api_key_from_its_environment(env, monkeypatch):
    """``moraft serve`` without --api_key takes MORAFT_API_KEY; an empty --api_key is refused."""
    import uvicorn

    base, adapters = env
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    monkeypatch.setenv("MORAFT_API_KEY", "from-the-environment")
    serve(base=str(base), adapters=str(adapters), log_level="warning")

    async def status(headers: dict) -> int:
        transport = httpx.ASGITransport(app=served[0])
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            return (await client.get("/v1/models", headers=headers)).status_code

    assert asyncio.run(status({})) == 401
    assert asyncio.run(status({"Authorization": "Bearer from-the-environment"})) == 200
    with pytest.raises(UserError, match="--api_key is empty"):
        serve(base=str(base), adapters=str(adapters), api_key=" ")


def test_the_serving_page_states_the_limits_the_code_applies():
    import inspect
    from pathlib import Path

    from moraft.serve.server import PROMPT_CHARS_PER_TOKEN

    page = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    assert f"at most {api.MAX_STOP_STRINGS} strings of at most {api.MAX_STOP_LENGTH} characters" in page
    assert f"default {PROMPT_CHARS_PER_TOKEN} characters per token of the context" in page
    assert f"default {inspect.signature(serve).parameters['max_request_mb'].default:g} MiB" in page
    for option in ("--max_request_mb", "--max_prompt_chars", "--api_key", "MORAFT_API_KEY"):
        assert option in page and option in serve.__doc__, option
