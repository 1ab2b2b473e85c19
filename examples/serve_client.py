"""A client for ``moraft serve``'s OpenAI-style HTTP API, with nothing but the Python standard library.

Start a server (``pip install 'moraft[serve]'``), then point this script at it:

    moraft serve --base path/to/base-model --adapters path/to/adapters/ --port 8000
    python examples/serve_client.py --url http://127.0.0.1:8000 --prompt "Hello"

It lists the models (the base and every adapter directory), asks each adapter for a greedy completion, asks the first
one for a chat completion, and streams the first one's completion as server-sent events, checking that the streamed
text is the text it was given whole. ``--json FILE`` also writes every answer to a file. A server started with
``--api_key`` (or ``MORAFT_API_KEY``) wants the key on every ``/v1`` request: this script sends ``MORAFT_API_KEY``
when it is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Iterator


def headers() -> dict:
    """JSON, and ``Authorization: Bearer $MORAFT_API_KEY`` when that variable is set."""
    key = os.environ.get("MORAFT_API_KEY")
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


def call(url: str, path: str, body: dict | None = None, timeout: float = 120) -> dict:
    """GET (no body) or POST a JSON body; the decoded JSON answer. An HTTP error exits with the server's message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers=headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:  # OpenAI-style {"error": {"message", "type", "param", "code"}}
        raise SystemExit(f"{path}: HTTP {err.code}: {json.load(err)['error']['message']}") from None


def stream(url: str, path: str, body: dict, timeout: float = 120) -> Iterator[dict]:
    """POST with ``"stream": true``; each ``data: {...}`` event until ``data: [DONE]``."""
    request = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(), headers=headers())
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return
            yield json.loads(line[len("data: "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server, without /v1")
    parser.add_argument("--prompt", default="Hello")
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--json", help="also write every answer to this JSON file")
    args = parser.parse_args()
    url = args.url.rstrip("/") + "/v1"

    models = [m["id"] for m in call(url, "/models")["data"]]
    base, adapters = models[0], models[1:]
    print(f"base model: {base}; adapters: {', '.join(adapters) or '(none)'}")
    greedy = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}

    completions = {}
    for model in adapters or [base]:
        answer = call(url, "/completions", {"model": model, **greedy})
        completions[model] = answer["choices"][0]["text"]
        print(f"{model}: {args.prompt!r} -> {completions[model]!r} ({answer['usage']['completion_tokens']} tokens)")

    first = (adapters or [base])[0]
    chat = call(url, "/chat/completions", {"model": first, "messages": [{"role": "user", "content": args.prompt}],
                                           "max_tokens": args.max_tokens, "temperature": 0})
    reply = chat["choices"][0]["message"]["content"]
    print(f"{first} (chat): {reply!r}")

    streamed = "".join(event["choices"][0]["text"] for event in stream(url, "/completions", {"model": first, **greedy})
                       if event["choices"])
    print(f"{first} (streamed): {streamed!r}")
    if streamed != completions[first]:
        sys.exit(f"the streamed text {streamed!r} differs from the whole answer {completions[first]!r}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": models, "completions": completions, "chat": {first: reply},
                       "streamed": {first: streamed}}, f, indent=2)


if __name__ == "__main__":
    main()
