"""ETRC's distillation recipe, run small and offline: a teacher LLM writes question/answer pairs for a sample of the
corpus, a small student is trained on them with ``moraft train``, then served with ``moraft serve`` to write pairs for
the whole corpus (docs/data-comprehend.md has the recipe at full size).

What is real here and what is not:

- the corpus: real text available offline, the docstrings of Python standard library modules (paragraphs of 100 to
  200 characters, ASCII);
- the teacher is NOT an LLM: there is no hosted API on this machine, so it is a loopback OpenAI-compatible server
  (FastAPI + uvicorn) whose replies are scripted from the text in the prompt (what the text is about: its first
  words; how it ends: its last words). It stands in for the API model of ETRC's first step;
- the student is real: the built-in tiny LLaMA (the default model of ``moraft train``, saved as a directory so that
  ``moraft serve`` can load it), a MoRA adapter trained with the real ``moraft train`` command on the exported
  prompt-completion JSONL, served by the real ``moraft serve`` command on a loopback port;
- the counts printed at the end (how many of the student's replies parse) are measured, not assumed.

    python examples/distill_comprehension.py --workdir /tmp/distill [--documents 96] [--sample 48] [--steps 200]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from fastapi import FastAPI, Request  # the serve extra (FastAPI, uvicorn): the scripted teacher and moraft serve

PROMPT = """\
Write {{ num_pairs }} question-answer pairs about the text as JSON: {"pairs": [{"question": "...", "answer": "..."}]}
Text: {{ text }}
JSON:"""
NUM_PAIRS = 1  # pairs per document: one keeps the tiny student's sequences short

MODULES = ("json", "csv", "sqlite3", "argparse", "pathlib", "collections", "itertools", "functools", "re", "heapq",
           "bisect", "shutil", "tempfile", "textwrap", "string", "random", "statistics", "fractions", "decimal",
           "datetime", "calendar", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "base64", "struct",
           "pickle", "copy", "pprint", "enum", "dataclasses", "contextlib", "abc", "typing", "logging", "threading",
           "queue", "sched", "socket", "ssl", "http.client", "urllib.parse", "email", "html", "xml.dom", "difflib",
           "unittest", "doctest", "timeit", "trace", "tokenize", "ast", "dis", "inspect", "importlib", "zipimport")


def stdlib_corpus(documents: int) -> list[dict]:
    """Paragraphs of the standard library's docstrings (modules, then their public functions and classes)."""
    seen, rows = set(), []
    for name in MODULES:
        module = importlib.import_module(name)
        objects = [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            for paragraph in (doc or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if 100 <= len(text) <= 200 and text.isascii() and text not in seen and text[0].isupper():
                    seen.add(text)
                    rows.append({"id": f"{name}:{len(rows)}", "title": None, "text": text, "tokens": len(text)})
                    if len(rows) == documents:
                        return rows
    return rows


def scripted_reply(text: str, num_pairs: int) -> str:
    """The teacher's reply, written from the text (no LLM): what it is about and how it ends."""
    words = text.split()
    pairs = [{"question": "What is the text about?", "answer": " ".join(words[:6])},
             {"question": "How does the text end?", "answer": " ".join(words[-4:])}]
    return json.dumps({"pairs": pairs[:num_pairs]})


def teacher_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "scripted-teacher", "object": "model", "created": 0,
                                            "owned_by": "example"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        text = re.search(r"^Text: (.*)\nJSON:$", prompt, re.MULTILINE | re.DOTALL).group(1)
        message = {"role": "assistant", "content": scripted_reply(text, NUM_PAIRS)}
        return {"id": "t", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def moraft(*args: str) -> list[str]:
    return [sys.executable, "-m", "moraft", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--documents", type=int, default=96, help="the corpus size")
    parser.add_argument("--sample", type=int, default=48, help="documents the teacher writes pairs for")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the student")
    parser.add_argument("--learning_rate", type=float, default=5e-3, help="the student's learning rate")
    args = parser.parse_args()

    import uvicorn
    from datasets import Dataset

    from moraft.data.comprehend import ComprehendOptions, comprehend_corpus, distillation_data, sample_indices
    from moraft.train.builtin import tiny_llama

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    template, cache = work / "prompt.j2", work / "comprehend.sqlite"
    template.write_text(PROMPT)
    corpus = Dataset.from_list(stdlib_corpus(args.documents))
    summary: dict = {"documents": len(corpus)}

    # 1. the teacher writes pairs for a seeded sample (ETRC: the API model on a sample)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(teacher_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    teacher = ComprehendOptions(llm_url=f"http://127.0.0.1:{port}/v1", prompt=str(template), num_pairs=NUM_PAIRS,
                                max_documents=args.sample, seed=0)
    _, summary["teacher"] = comprehend_corpus(corpus, teacher, cache)
    server.should_exit = True
    thread.join()

    # 2. its accepted replies as training data for the student
    distill = work / "distill.jsonl"
    summary["distillation_examples"] = distillation_data(cache, distill, format="prompt-completion",
                                                         model="scripted-teacher")

    # 3. the student: the built-in tiny LLaMA saved as a directory, a MoRA adapter trained on the pairs
    base = work / "student-base"
    model, tokenizer = tiny_llama(hidden_size=64, num_layers=2)  # small: a CPU trains it in minutes
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = work / "adapters" / "student"
    started = time.perf_counter()
    subprocess.run(moraft("train", "--model", str(base), "--data", str(distill), "--adapter", "mora",
                          "--adapter.r", "16", "--data.seq_length", "1024", "--optimization.batch_size", "8",
                          "--optimization.learning_rate", str(args.learning_rate), "--optimization.max_steps", str(args.steps),
                          "--output.save_steps", "0", "--output", str(run), "--output.overwrite", "true"), check=True)
    summary["train_s"] = round(time.perf_counter() - started, 1)
    summary["train_final"] = json.loads((run / "train_summary.json").read_text())["final"]

    # 4. the student served by moraft serve writes pairs for the whole corpus
    port = free_port()
    serve = subprocess.Popen(moraft("serve", "--base", str(base), "--adapters", str(run.parent), "--port", str(port),
                                    "--log_level", "warning"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or serve.poll() is not None:
                    raise SystemExit("moraft serve did not start")
                time.sleep(0.5)
        student = ComprehendOptions(llm_url=f"http://127.0.0.1:{port}/v1", llm_model="student",
                                    endpoint="completions", prompt=str(template), num_pairs=NUM_PAIRS,
                                    max_tokens=120, concurrency=16)
        started = time.perf_counter()
        data, summary["student"] = comprehend_corpus(corpus, student, cache)
        summary["student_s"] = round(time.perf_counter() - started, 1)
    finally:
        serve.terminate()
        serve.wait(30)
    sampled = set(sample_indices(len(corpus), args.sample, 0))  # the documents the teacher wrote pairs for
    parsed = [bool(tasks) for tasks in data["llm_tasks"]]
    summary["student_parsed_seen"] = sum(p for i, p in enumerate(parsed) if i in sampled)
    summary["student_parsed_held_out"] = sum(p for i, p in enumerate(parsed) if i not in sampled)
    examples = [(corpus[i]["text"], data[i]["llm_tasks"]) for i in range(len(corpus)) if parsed[i]][:3]
    summary["student_examples"] = [{"text": t[:80], "pairs": p} for t, p in examples]
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
