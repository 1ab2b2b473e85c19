"""The comprehend stage (ETRC's LLM question/answer pairs) against real HTTP servers on loopback: a scripted
OpenAI-compatible server whose replies are written from the document in the prompt (it counts requests and the most
in flight, and fails on cue), a real ``moraft serve`` of a tiny random model, and the same model loaded locally."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path

import pytest
from datasets import Dataset, load_dataset
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from helpers import LiveServer, MoraftServe, free_socket, run_cli

from moraft.data.comprehend import (
    ComprehendOptions,
    MalformedResponse,
    RejectedReply,
    ReplyCache,
    cache_key,
    comprehend_corpus,
    distillation_data,
    parse_reply,
    reply_text,
)
from moraft.errors import MissingPathError, UserError

PAIR = {"question": "What does the text name?", "answer": "A thing."}
GOOD = json.dumps({"pairs": [PAIR, {"question": "And then?", "answer": "Another."}]})
# what the scripted teacher answers for a document whose text holds the key
REPLIES = {
    "GOOD": GOOD,
    "FENCED": f"```json\n{GOOD}\n```",
    "BADJSON": '{"pairs": [{"question": "Q", "answer": "A"}',
    "SCHEMA": json.dumps({"pairs": [{"question": "Q"}]}),
    "PROSE": f"Here are the pairs: {GOOD}",
}
# responses that are no completion at all, and the reason each is counted under (max_reply_bytes=20_000)
MALFORMED = {
    "HTMLPAGE": (HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>"), "not a JSON response"),
    "NOCHOICES": (JSONResponse({"id": "c", "object": "chat.completion"}), "no choices"),
    "EMPTYCHOICES": (JSONResponse({"id": "c", "choices": []}), "empty choices"),
    "NOMESSAGE": (JSONResponse({"choices": [{"index": 0, "finish_reason": "stop"}]}), "no message"),
    "NUMBERCONTENT": (JSONResponse({"choices": [{"message": {"role": "assistant", "content": 12345}}]}),
                      "content not a string"),
    "PARTSCONTENT": (JSONResponse({"choices": [{"message": {"content": [{"type": "text", "text": GOOD}]}}]}),
                     "content not a string"),
    "NOTUTF8": (Response(b'{"choices": [{"message": {"content": "caf\xe9"}}]}', media_type="application/json"),
                "not a JSON response"),
    "HUGEREPLY": (JSONResponse({"choices": [{"message": {"content": GOOD + " " * 50_000}}]}), "too large"),
}


class Teacher:
    """A loopback OpenAI-compatible server. Its reply to a prompt is REPLIES[the first key found in it]. It fails the
    first ``fail_first`` requests, and every request after the first ``answer_only`` ones, with ``fail_status``."""

    def __init__(self, fail_first: int = 0, answer_only: int | None = None, fail_status: int = 500,
                 delay: float = 0.0, models_page: Response | None = None) -> None:
        self.fail_first, self.answer_only, self.fail_status, self.delay = fail_first, answer_only, fail_status, delay
        self.requests, self.answered, self.in_flight, self.max_in_flight = 0, 0, 0, 0
        self.bodies: list[dict] = []
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            if models_page is not None:
                return models_page
            return {"object": "list", "data": [{"id": "teacher", "object": "model", "created": 0, "owned_by": "t"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests += 1
            self.bodies.append(body)
            if body["model"] == "missing":
                return JSONResponse({"error": {"message": "The model 'missing' does not exist",
                                               "type": "not_found_error"}}, status_code=404)
            if self.requests <= self.fail_first or (self.answer_only is not None and self.answered >= self.answer_only):
                return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}},
                                    status_code=self.fail_status)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.in_flight -= 1
            self.answered += 1
            prompt = body["messages"][0]["content"]
            raw = next((response for key, (response, _) in MALFORMED.items() if key in prompt), None)
            if raw is not None:
                return raw
            reply = next((r for key, r in REPLIES.items() if key in prompt), GOOD)
            message = {"role": "assistant", "content": reply}
            return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

        self.server = LiveServer(app)

    def __enter__(self) -> "Teacher":
        self.server.__enter__()
        self.url = self.server.url + "/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)


def corpus(keys: list[str]) -> Dataset:
    rows = [{"id": f"doc{i}", "title": f"Title {i}" if i % 2 else None,
             "text": f"Document {i} is about {key}. It has two sentences.", "tokens": 50} for i, key in enumerate(keys)]
    return Dataset.from_list(rows)


def replies(cache: Path) -> list[tuple]:
    with sqlite3.connect(cache) as db:
        return db.execute("SELECT doc_id, model, status, reply, reason FROM replies ORDER BY doc_id").fetchall()


# -- parsing ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, reason", [
    ("not json at all", "not JSON"),
    ('{"pairs": [', "not JSON"),
    ("```python\n" + GOOD + "\n```", "not JSON"),           # a fence of another language
    ("Sure! " + GOOD, "not JSON"),                           # prose around the JSON
    ("[" + json.dumps(PAIR) + "]", "schema"),                # a bare list
    ('{"pairs": []}', "schema"),
    ('{"pairs": [{"question": "Q"}]}', "schema"),
    ('{"pairs": [{"question": "Q", "answer": "  "}]}', "schema"),
    ('{"pairs": [{"question": "Q", "answer": 3}]}', "schema"),
    ('{"pairs": [{"question": "Q", "answer": "A", "source": "x"}]}', "schema"),
    ('{"pairs": [{"question": "Q", "answer": "A"}], "note": 1}', "schema"),
])
def test_malformed_replies_are_rejected_with_their_reason(reply, reason):
    with pytest.raises(RejectedReply, match=f"^{reason}"):
        parse_reply(reply)


def test_valid_replies_parse_fenced_or_not_and_keep_num_pairs():
    expected = [PAIR, {"question": "And then?", "answer": "Another."}]
    assert parse_reply(GOOD) == expected
    assert parse_reply(f"```json\n{GOOD}\n```") == expected
    assert parse_reply(f"  ```\n{GOOD}```\n") == expected
    assert parse_reply(json.dumps({"pairs": [{"question": " Q ", "answer": "A\n"}]})) == [{"question": "Q",
                                                                                           "answer": "A"}]
    assert parse_reply(GOOD, num_pairs=1) == [PAIR]


# -- against the scripted teacher ---------------------------------------------------------------------------------


def test_valid_replies_become_tasks_and_malformed_ones_are_counted(tmp_path):
    keys = ["GOOD", "FENCED", "BADJSON", "SCHEMA", "PROSE", "GOOD"]
    with Teacher() as teacher:
        options = ComprehendOptions(llm_url=teacher.url, num_pairs=2, structured_output=True)
        data, report = comprehend_corpus(corpus(keys), options, tmp_path / "cache.sqlite")
    assert data.column_names == ["id", "llm_tasks"]
    assert data["id"] == [f"doc{i}" for i in range(6)]
    expected = [PAIR, {"question": "And then?", "answer": "Another."}]
    assert data["llm_tasks"] == [expected, expected, [], [], [], expected]
    assert {k: report[k] for k in ("documents", "sampled", "cached", "generated", "rejected", "failed", "pairs")} == {
        "documents": 6, "sampled": 6, "cached": 0, "generated": 6, "rejected": 3, "failed": 0, "pairs": 6}
    assert report["model"] == "teacher"  # the first model of /v1/models
    assert report["rejected_reasons"] == {"not JSON": 2, "schema": 1}
    # the prompt: the document, its title where it has one, the number of pairs; the schema as response_format
    prompt = next(b for b in teacher.bodies if "Document 1 " in b["messages"][0]["content"])["messages"][0]["content"]
    assert "Title: Title 1" in prompt and "write 2 question-answer pairs" in prompt
    assert "Title:" not in next(b for b in teacher.bodies if "Document 0 " in b["messages"][0]["content"])[
        "messages"][0]["content"]
    schema = teacher.bodies[0]["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["pairs"]
    # every reply is in the cache, the rejected ones with their reason
    rows = replies(tmp_path / "cache.sqlite")
    assert [r[2] for r in rows] == ["ok", "ok", "rejected", "rejected", "rejected", "ok"]
    assert rows[2][3] == REPLIES["BADJSON"] and rows[2][4].startswith("not JSON")


def test_responses_that_are_no_completion_are_counted_never_fatal_and_not_cached(tmp_path):
    cache, docs = tmp_path / "cache.sqlite", corpus(["GOOD", *MALFORMED])
    options = dict(llm_model="teacher", max_reply_bytes=20_000, concurrency=3)
    with Teacher() as teacher:
        data, report = comprehend_corpus(docs, ComprehendOptions(llm_url=teacher.url, **options), cache)
        assert data["llm_tasks"][0] == [PAIR, {"question": "And then?", "answer": "Another."}]
        assert data["llm_tasks"][1:] == [[]] * len(MALFORMED)
        assert (report["generated"], report["malformed"], report["rejected"], report["failed"]) == (1, 8, 0, 0)
        reasons: dict[str, int] = {}
        for _, reason in MALFORMED.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        assert report["malformed_reasons"] == reasons
        assert [row[0] for row in replies(cache)] == ["doc0"]  # none of them is cached (the huge one least of all)
        _, again = comprehend_corpus(docs, ComprehendOptions(llm_url=teacher.url, **options), cache)
    assert teacher.requests == 2 * len(MALFORMED) + 1  # a rerun asks for them again, not for the good one
    assert (again["cached"], again["malformed"]) == (1, 8)


def test_a_stage_with_malformed_responses_is_never_up_to_date(tmp_path, capsys):
    docs, out = tmp_path / "docs.jsonl", tmp_path / "out"
    corpus([f"{key} {'words ' * 30}" for key in ("GOOD", "HTMLPAGE")]).to_json(str(docs))
    flags = ["data", "--corpus", str(docs), "--output", str(out), "--stages", "comprehend", "--comprehend.llm_model",
             "teacher"]
    with Teacher() as teacher:
        for run in range(2):
            status, stdout, stderr = run_cli(flags + ["--comprehend.llm_url", teacher.url], capsys)
            assert status == 0, stderr
            assert "comprehend: running" in stdout and "1 document(s) got no usable reply" in stdout
            assert teacher.requests == 2 + run  # the rerun asks for the malformed one only
    stats = json.loads((out / "stats.json").read_text())["stages"]["comprehend"]
    assert (stats["cached"], stats["malformed"], stats["malformed_reasons"]) == (1, 1, {"not a JSON response": 1})


@pytest.mark.parametrize("body, endpoint, reason", [
    (b'{"choices": [{"text": 5}]}', "completions", "content not a string"),
    (b'{"choices": [{"text": "ok"}]}', "completions", None),
    (b'{"choices": [{"message": {"content": null}}]}', "chat", None),   # no text: an empty reply, rejected later
    (b'[1, 2]', "chat", "no choices"),
    (b"", "chat", "not a JSON response"),
])
def test_reply_text_of_each_response_shape(body, endpoint, reason):
    if reason is None:
        assert reply_text(body, endpoint) in ("ok", "")
    else:
        with pytest.raises(MalformedResponse, match=f"^{reason}"):
            reply_text(body, endpoint)


def test_a_models_page_that_is_no_list_is_one_clear_error(tmp_path):
    with Teacher(models_page=HTMLResponse("<html>login</html>")) as teacher:
        with pytest.raises(UserError, match=rf"^LLM endpoint {re.escape(teacher.url)}: its /models reply is not a list "
                                            "of models .*pass --comprehend.llm_model"):
            comprehend_corpus(corpus(["GOOD"]), ComprehendOptions(llm_url=teacher.url), tmp_path / "c.sqlite")


def test_a_full_disk_under_the_reply_cache_is_one_line(tmp_path, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")  # what sqlite raises when a write meets ENOSPC

    monkeypatch.setattr(ReplyCache, "put", full)
    docs, out = tmp_path / "docs.jsonl", tmp_path / "out"
    corpus([f"GOOD {'words ' * 30}"] * 3).to_json(str(docs))
    with Teacher() as teacher:
        status, _, stderr = run_cli(["data", "--corpus", str(docs), "--output", str(out), "--stages", "comprehend",
                                     "--comprehend.llm_url", teacher.url, "--comprehend.llm_model", "teacher"], capsys)
    assert status == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(
        f"moraft data: error: no space left on the device of {out} for the comprehend stage: it needs about ")
    assert (out / "corpus").is_dir() and not (out / "comprehend").exists()


def test_concurrency_bounds_the_requests_in_flight(tmp_path):
    with Teacher(delay=0.15) as teacher:
        options = ComprehendOptions(llm_url=teacher.url, concurrency=3)
        _, report = comprehend_corpus(corpus(["GOOD"] * 10), options, tmp_path / "cache.sqlite")
    assert report["generated"] == 10
    assert teacher.max_in_flight == 3


def test_failed_requests_are_retried_then_succeed(tmp_path):
    with Teacher(fail_first=2) as teacher:
        options = ComprehendOptions(llm_url=teacher.url, concurrency=1, retries=2)
        data, report = comprehend_corpus(corpus(["GOOD"] * 3), options, tmp_path / "cache.sqlite")
    assert teacher.requests == 3 + 2
    assert report["generated"] == 3 and report["rejected"] == 0 and all(data["llm_tasks"])


def test_endpoint_down_stops_with_done_work_cached_and_a_rerun_pays_only_the_rest(tmp_path):
    cache = tmp_path / "cache.sqlite"
    docs = corpus(["GOOD"] * 6)
    with Teacher(answer_only=2, fail_status=503) as teacher:
        options = ComprehendOptions(llm_url=teacher.url, llm_model="teacher", concurrency=1, retries=1)
        with pytest.raises(UserError) as err:
            comprehend_corpus(docs, options, cache)
    message = str(err.value)
    assert message.startswith(f"LLM endpoint {teacher.url} did not answer after 2 tries: HTTP 503")
    assert f"2 of 6 documents are done and cached in {cache}; rerun to continue" in message
    assert len(replies(cache)) == 2
    with Teacher() as teacher:
        data, report = comprehend_corpus(docs, ComprehendOptions(llm_url=teacher.url, llm_model="teacher"), cache)
    assert teacher.requests == 4  # the two cached documents are not asked again
    assert (report["cached"], report["generated"]) == (2, 4) and all(data["llm_tasks"])


def test_no_server_at_all_is_one_clear_error(tmp_path):
    sock = free_socket()  # bound, not listening: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        with pytest.raises(UserError, match=rf"^LLM endpoint {re.escape(url)} did not answer after 1 tries: "
                                            "APIConnectionError"):
            comprehend_corpus(corpus(["GOOD"]), ComprehendOptions(llm_url=url, retries=0), tmp_path / "c.sqlite")
        with pytest.raises(UserError, match=r"0 of 1 documents are done"):
            comprehend_corpus(corpus(["GOOD"]), ComprehendOptions(llm_url=url, llm_model="m", retries=0),
                              tmp_path / "c.sqlite")
    finally:
        sock.close()


def test_an_unknown_model_is_refused_at_once_not_retried(tmp_path):
    with Teacher() as teacher:
        options = ComprehendOptions(llm_url=teacher.url, llm_model="missing", retries=3)
        with pytest.raises(UserError, match=rf"^LLM endpoint {re.escape(teacher.url)} refused the request: HTTP 404: "
                                            r"The model 'missing' does not exist; 0 of 2 documents are done"):
            comprehend_corpus(corpus(["GOOD"] * 2), options, tmp_path / "c.sqlite")
    assert teacher.requests <= 2  # one per worker, none retried


def test_rejected_replies_stay_cached_unless_retry_rejected(tmp_path):
    cache, docs = tmp_path / "cache.sqlite", corpus(["GOOD", "BADJSON", "SCHEMA"])
    with Teacher() as teacher:
        options = ComprehendOptions(llm_url=teacher.url)
        comprehend_corpus(docs, options, cache)
        _, report = comprehend_corpus(docs, options, cache)
        assert teacher.requests == 3 and report["cached"] == 3 and report["rejected"] == 2
        _, report = comprehend_corpus(docs, ComprehendOptions(llm_url=teacher.url, retry_rejected=True), cache)
        assert teacher.requests == 5 and report["generated"] == 2


def test_the_cache_key_changes_with_the_prompt_the_model_and_the_sampling(tmp_path):
    base = cache_key("text", "prompt", "m", {"temperature": 0})
    assert base == cache_key("text", "prompt", "m", {"temperature": 0})
    assert len({base, cache_key("text2", "prompt", "m", {"temperature": 0}),
                cache_key("text", "prompt2", "m", {"temperature": 0}), cache_key("text", "prompt", "m2",
                {"temperature": 0}), cache_key("text", "prompt", "m", {"temperature": 0.5})}) == 5
    template = tmp_path / "prompt.j2"
    template.write_text("Questions about: {{ text }}\nAnswer in JSON.")
    cache, docs = tmp_path / "cache.sqlite", corpus(["GOOD"] * 3)
    with Teacher() as teacher:
        runs = [ComprehendOptions(llm_url=teacher.url, llm_model="teacher"),
                ComprehendOptions(llm_url=teacher.url, llm_model="teacher"),            # the same: all cached
                ComprehendOptions(llm_url=teacher.url, llm_model="other"),              # another model
                ComprehendOptions(llm_url=teacher.url, llm_model="teacher", prompt=str(template)),  # another prompt
                ComprehendOptions(llm_url=teacher.url, llm_model="teacher", max_tokens=100)]       # other sampling
        requests = []
        for options in runs:
            before = teacher.requests
            comprehend_corpus(docs, options, cache)
            requests.append(teacher.requests - before)
        assert requests == [3, 0, 3, 3, 3]
        # the fourth run's requests (in any order: they are concurrent) carry the custom prompt
        custom = sorted(b["messages"][0]["content"] for b in teacher.bodies[6:9])
        assert custom == [f"Questions about: Document {i} is about GOOD. It has two sentences.\nAnswer in JSON."
                          for i in range(3)]


def test_a_custom_prompt_with_a_bad_placeholder_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.j2"
    bad.write_text("Write {{ num_pairs }} questions about {{ txt }} titled {{ heading }}.")
    with pytest.raises(UserError, match=r"uses \{\{ heading \}\}, \{\{ txt \}\}; the placeholders are "
                                        r"\{\{ text \}\}, \{\{ title \}\}, \{\{ num_pairs \}\}"):
        comprehend_corpus(corpus(["GOOD"]), ComprehendOptions(llm_url="http://127.0.0.1:9/v1", prompt=str(bad)),
                          tmp_path / "c.sqlite")
    broken = tmp_path / "broken.j2"
    broken.write_text("About {{ text }\n")
    with pytest.raises(UserError, match=r"broken.j2'?: line 1: "):
        comprehend_corpus(corpus(["GOOD"]), ComprehendOptions(llm_url="http://127.0.0.1:9/v1", prompt=str(broken)),
                          tmp_path / "c.sqlite")
    textless = tmp_path / "textless.j2"
    textless.write_text("Write {{ num_pairs }} questions.")
    with pytest.raises(UserError, match=r"never uses \{\{ text \}\}"):
        comprehend_corpus(corpus(["GOOD"]), ComprehendOptions(llm_url="http://127.0.0.1:9/v1", prompt=str(textless)),
                          tmp_path / "c.sqlite")
    with pytest.raises(MissingPathError, match="comprehend.prompt"):
        comprehend_corpus(corpus(["GOOD"]), ComprehendOptions(llm_url="http://127.0.0.1:9/v1",
                                                              prompt=str(tmp_path / "none.j2")), tmp_path / "c.sqlite")
    assert not (tmp_path / "c.sqlite").exists()  # refused before anything was written


def test_a_remote_url_without_its_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_LLM_KEY", raising=False)
    options = ComprehendOptions(llm_url="https://api.example.com/v1", api_key_env="MY_LLM_KEY")
    with pytest.raises(UserError, match="needs an API key: set the environment variable MY_LLM_KEY"):
        comprehend_corpus(corpus(["GOOD"]), options, tmp_path / "c.sqlite")


@pytest.mark.parametrize("change, expected", [
    ({"llm_url": "ftp://x"}, "comprehend.llm_url='ftp://x' is invalid"),
    ({"llm_url": "http://127.0.0.1:1/v1", "local_model": "m"}, "both set"),
    ({"concurrency": 0}, "comprehend.concurrency=0 is invalid; expected an integer >= 1"),
    ({"max_documents": 0}, "comprehend.max_documents=0 is invalid"),
    ({"temperature": 3.0}, "comprehend.temperature=3.0 is invalid"),
])
def test_bad_options_are_refused(change, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        ComprehendOptions(**change).validate()


def test_max_documents_processes_a_seeded_sample(tmp_path):
    docs = corpus(["GOOD"] * 8)
    with Teacher() as teacher:
        options = ComprehendOptions(llm_url=teacher.url, max_documents=3, seed=1)
        data, report = comprehend_corpus(docs, options, tmp_path / "cache.sqlite")
        again, report2 = comprehend_corpus(docs, options, tmp_path / "cache.sqlite", num_proc=2)
    assert teacher.requests == 3
    assert (report["sampled"], report["generated"], report2["cached"]) == (3, 3, 3)
    assert len(data) == 8 and sum(bool(t) for t in data["llm_tasks"]) == 3
    assert data["llm_tasks"] == again["llm_tasks"]


def test_without_an_llm_the_stage_gives_empty_tasks(tmp_path):
    data, report = comprehend_corpus(corpus(["GOOD"] * 2), ComprehendOptions(), tmp_path / "c.sqlite")
    assert data["llm_tasks"] == [[], []] and report["sampled"] == 0
    assert not (tmp_path / "c.sqlite").exists()


def test_distillation_data_exports_accepted_replies_as_training_jsonl(tmp_path):
    cache = tmp_path / "cache.sqlite"
    with Teacher() as teacher:
        comprehend_corpus(corpus(["GOOD", "BADJSON", "FENCED"]), ComprehendOptions(llm_url=teacher.url), cache)
        prompts = [b["messages"][0]["content"] for b in teacher.bodies]
    assert distillation_data(cache, tmp_path / "chat.jsonl") == 2
    chat = load_dataset("json", data_files=str(tmp_path / "chat.jsonl"), split="train")
    assert chat.column_names == ["messages"]
    for messages in chat["messages"]:
        assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] in prompts
        assert messages[1]["content"] == json.dumps(json.loads(GOOD))  # canonical JSON, the fence gone
    assert distillation_data(cache, tmp_path / "pc.jsonl", format="prompt-completion") == 2
    first = json.loads((tmp_path / "pc.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "completion"} and parse_reply(first["completion"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # a second model's replies in the same cache: the export must be told which
    with Teacher() as teacher:
        comprehend_corpus(corpus(["GOOD"]), ComprehendOptions(llm_url=teacher.url, llm_model="student"), cache)
    with pytest.raises(UserError, match=r"holds replies of 2 models \(student, teacher\)"):
        distillation_data(cache, tmp_path / "x.jsonl")
    assert distillation_data(cache, tmp_path / "x.jsonl", model="student") == 1
    with pytest.raises(MissingPathError):
        distillation_data(tmp_path / "nope.sqlite", tmp_path / "y.jsonl")


def test_distill_data_command(tmp_path, capsys):
    cache = tmp_path / "cache.sqlite"
    with Teacher() as teacher:
        comprehend_corpus(corpus(["GOOD", "BADJSON"]), ComprehendOptions(llm_url=teacher.url), cache)
    out = tmp_path / "distill.jsonl"
    status, stdout, stderr = run_cli(["distill-data", str(cache), str(out), "--format", "prompt-completion"], capsys)
    assert status == 0, stderr
    assert "1 examples written" in stdout and set(json.loads(out.read_text())) == {"prompt", "completion"}
    status, _, stderr = run_cli(["distill-data", str(tmp_path / "none.sqlite"), str(out)], capsys)
    assert status == 2 and stderr.strip().splitlines()[-1].startswith("moraft distill-data: error: comprehend cache")


# -- a real moraft serve, and the same model locally --------------------------------------------------------------


def test_against_a_real_moraft_serve_replies_are_counted_and_the_local_model_writes_the_same(llama_dir, tmp_path):
    """A tiny random model writes no JSON: every reply is rejected, counted, never fatal; a document too long for
    its context is refused by the server (400) and counted as failed. The same model loaded locally
    (comprehend.local_model) writes, greedily, the same replies as the server did."""
    docs = corpus(["GOOD", "SCHEMA", "PROSE"]).add_item({"id": "long", "title": None, "text": "word " * 400,
                                                         "tokens": 2000})
    cache = tmp_path / "cache.sqlite"
    common = dict(endpoint="completions", max_tokens=12, temperature=0.0)
    with MoraftServe(llama_dir, base_name="tiny") as served:
        options = ComprehendOptions(llm_url=served.url + "/v1", concurrency=2, **common)
        data, report = comprehend_corpus(docs, options, cache)
    assert report["model"] == "tiny"
    assert (report["generated"], report["rejected"], report["failed"], report["pairs"]) == (3, 3, 1, 0)
    assert data["llm_tasks"] == [[], [], [], []]
    served_replies = {doc: reply for doc, model, _, reply, _ in replies(cache) if model == "tiny"}
    assert len(served_replies) == 3 and all(served_replies.values())

    data, report = comprehend_corpus(docs, ComprehendOptions(local_model=str(llama_dir), batch_size=4, **common), cache)
    assert report["model"].startswith("local:") and report["cached"] == 0
    assert (report["generated"], report["rejected"], report["failed"]) == (3, 3, 1)
    local_replies = {doc: reply for doc, model, _, reply, _ in replies(cache) if model.startswith("local:")}
    assert local_replies == served_replies
    _, report = comprehend_corpus(docs, ComprehendOptions(local_model=str(llama_dir), **common), cache)
    assert report["cached"] == 3  # the failed long document is asked again, the others not


def test_a_local_model_that_is_not_here_is_one_clear_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    expected = (f"comprehend.local_model {missing} is neither a local directory nor a Hugging Face Hub model id .*"
                "'builtin:smollm2-135m-instruct', a moraft train run or an adapter")
    with pytest.raises(MissingPathError, match=expected):
        comprehend_corpus(corpus(["GOOD"]), ComprehendOptions(local_model=missing), tmp_path / "cache.sqlite")


def test_a_local_chat_model_stops_at_the_end_of_its_turn(llama_dir):
    """The built-in chat template ends an assistant turn with <|end|>, not EOS: generation stops at either."""
    from moraft.data.comprehend import _Local
    from moraft.train.builtin import char_tokenizer

    tokenizer = char_tokenizer()
    local = _Local(ComprehendOptions(local_model=str(llama_dir)))
    assert local.chat and local.stop_ids == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")})
    assert not _Local(ComprehendOptions(local_model=str(llama_dir), endpoint="completions")).chat


# -- the built-in real model, locally ---------------------------------------------------------------------------------


@pytest.mark.real_model
def test_the_built_in_real_model_writes_replies_locally(tmp_path, smollm2_dir):
    """builtin:smollm2-135m-instruct as comprehend.local_model, no server: the user message in its chat template, the
    batch left-padded with pad = EOS = <|im_end|>, generation stopping at <|im_end|>. Two Debian documents of unequal
    length, a few new tokens each: each reply is counted (accepted or rejected) and none fails; the shorter prompt,
    padded in the batch, gets the reply it gets alone."""
    from moraft.data.comprehend import _Local, load_template, render_prompt
    from moraft.models import SMOLLM2

    lines = (Path(__file__).parent / "fixtures" / "debian" / "corpus.jsonl").read_text().splitlines()[1:3]
    docs = Dataset.from_list([{**json.loads(line), "tokens": 0} for line in lines])
    options = ComprehendOptions(local_model=SMOLLM2, max_tokens=4, batch_size=2)
    cache = tmp_path / "cache.sqlite"

    data, report = comprehend_corpus(docs, options, cache)
    assert report["model"] == f"local:{SMOLLM2}@{smollm2_dir.name}"
    assert report["generated"] == 2 and report["failed"] == report["malformed"] == 0
    assert report["rejected"] + sum(1 for tasks in data["llm_tasks"] if tasks) == 2
    batched = {doc: reply for doc, _, _, reply, _ in replies(cache)}
    assert len(batched) == 2 and all(batched.values())

    local = _Local(options)
    end = local.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert local.chat and local.stop_ids == [end] and local.tokenizer.pad_token_id == end
    prompts = {row["id"]: render_prompt(load_template(None), row["text"], row["title"], 3) for row in docs}
    shorter = min(prompts, key=lambda doc: len(local.encode(prompts[doc])))
    assert len({len(local.encode(prompt)) for prompt in prompts.values()}) == 2  # the batch was padded
    assert local.generate([prompts[shorter]]) == [batched[shorter]]
