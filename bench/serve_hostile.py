"""``cmiguard serve`` against hostile clients, over real sockets.

    python bench/serve_hostile.py [--teacher] [--requests 1200] [--seconds 60]

One uvicorn server in this process (a tiny model on the teacher's tokenizer,
or the teacher itself), a transform applied per step. Three measurements:

1. **Fuzz**: ``--requests`` malformed requests to both endpoints — every
   field replaced by wrong types, out-of-range and non-finite numbers, huge
   and empty values, bad Unicode; bodies that are not JSON, chunked bodies
   over the limit, bodies that stop half-way — each followed by ``/health``.
   Counts the answers by status; any ≥ 500 or a dead server is a failure.
2. **Abandoned streams**: 50 streams that ask for 200 tokens, each read to
   its first piece and dropped; then one request of one token, timed, next to
   the time of one decoding step (its rows are not waited for).
3. **Load**: 64 concurrent clients for ``--seconds``; failures and the
   process's resident memory before and after.

Writes ``bench/results_serve_hostile.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import uvicorn

from cmiguard import LowRankTransform
from cmiguard.serve.server import ServerConfig, create_app
from cmiguard.train.models import load_teacher, tiny_model

KEY = "bench"
AUTH = {"Authorization": f"Bearer {KEY}"}
HERE = Path(__file__).resolve().parent
ASK = {"model": "m", "prompt": "The capital of France is", "max_tokens": 4}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "seed", "stop", "n", "logprobs", "top_logprobs", "echo", "best_of", "stream",
    "stream_options", "presence_penalty", "frequency_penalty", "user", "logit_bias", "top_k",
    "tools", "unknown_field",
]  # fmt: skip
VALUES = [
    None, True, -1, 0, 2**31, 2**64, -(10**30), 1e-40, 1e308, "NaN", "Infinity", "",
    "x" * 100_000, "\ud800", "\udfff tail", [], [None], [[1, 2], "x"], [-1, 10**9], {"a": 1},
    [{"role": "user", "content": 3}], [{"role": "system"}], "a" * 300, ["s"] * 9,
]  # fmt: skip


def serve(teacher: bool):
    model, tokenizer = load_teacher()
    if not teacher:
        model = tiny_model(len(tokenizer))
    transform = LowRankTransform(model.config.vocab_size, 8)
    config = ServerConfig(
        "m", api_key=KEY, max_new_tokens=256, max_batch=16, max_queue=512, body_timeout_s=2.0
    )
    app = create_app(model, tokenizer, transform, config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, port


def encode(body: dict) -> bytes:
    """JSON with Python's NaN/Infinity (what Starlette parses) and lone surrogates."""
    text = json.dumps(body)
    for name in ("NaN", "Infinity"):
        text = text.replace(f'"{name}"', name)
    return text.encode("utf-8", "surrogatepass")


def raw(port: int, data: bytes) -> str:
    """Send raw bytes; the status code of the answer ('none' if the socket closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        try:
            line = s.recv(100).split(b"\r\n", 1)[0].split()
        except TimeoutError:
            return "none"
    return line[1].decode() if len(line) > 1 else "none"


def malformed(port: int, rng: random.Random) -> str:
    """One hostile request; its status."""
    kind = rng.random()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    if kind < 0.05:  # chunked, over the 1 MiB limit
        piece = b"y" * 65536
        body = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * 20 + b"0\r\n\r\n"
        return raw(port, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + body)
    if kind < 0.08:  # a body that stops half-way
        return raw(port, (head + "Content-Length: 200\r\n\r\n").encode() + b'{"model": "m"')
    if kind < 0.12:  # not JSON
        junk = rng.choice([b"{", b"[]", b"null", b"\xff\xfe", b'{"model": "m", "prompt": }'])
        return raw(port, (head + f"Content-Length: {len(junk)}\r\n\r\n").encode() + junk)
    chat = rng.random() < 0.5
    body = dict(CHAT if chat else ASK)
    for _ in range(rng.choice((1, 1, 2))):
        body[rng.choice(FIELDS)] = rng.choice(VALUES)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    data = encode(body)
    head = head.replace("/v1/completions", path)
    return raw(port, (head + f"Content-Length: {len(data)}\r\n\r\n").encode() + data)


def fuzz(port: int, requests: int) -> dict:
    rng = random.Random(0)
    statuses, dead = Counter(), 0
    url = f"http://127.0.0.1:{port}/health"
    for _ in range(requests):
        statuses[malformed(port, rng)] += 1
        dead += httpx.get(url, timeout=15).status_code != 200
    return {"requests": requests, "statuses": dict(statuses), "health_failures": dead}


def abandoned_streams(port: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"

    def timed(tokens: int) -> float:
        start = time.perf_counter()
        httpx.post(url, json=ASK | {"max_tokens": tokens}, headers=AUTH, timeout=120)
        return time.perf_counter() - start

    timed(1)  # warm-up
    idle = min(timed(1) for _ in range(5))  # one token on an idle server
    step = (timed(33) - idle) / 32

    async def drop(client):
        body = ASK | {"max_tokens": 200, "stream": True, "temperature": 1.0}
        async with client.stream("POST", url, json=body, headers=AUTH) as r:
            async for line in r.aiter_lines():
                if line:
                    return

    async def all_dropped():
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(drop(client) for _ in range(50)))

    asyncio.run(all_dropped())
    start = time.perf_counter()
    one = httpx.post(url, json=ASK | {"max_tokens": 1}, headers=AUTH, timeout=120)
    latency = time.perf_counter() - start
    return {
        "streams": 50,
        "decoding_step_s": step,
        "idle_request_s": idle,
        "next_request_s": latency,
        # what the abandoned batch still cost the next request, in decoding steps
        "excess_steps": (latency - idle) / step,
        "status": one.status_code,
    }


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(port: int, seconds: float, clients: int = 64) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    codes: Counter = Counter()

    async def client_loop(client, i):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            body = ASK | {"seed": i, "temperature": 1.0, "logprobs": 3}
            try:
                r = await client.post(url, json=body, headers=AUTH)
                codes[r.status_code] += 1
            except httpx.HTTPError as exc:
                codes[type(exc).__name__] += 1

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=128)) as c:
            await asyncio.gather(*(client_loop(c, i) for i in range(clients)))

    before = rss_mib()
    asyncio.run(run())
    after = rss_mib()
    return {
        "clients": clients,
        "seconds": seconds,
        "answers": {str(k): v for k, v in codes.items()},
        "failures": sum(v for k, v in codes.items() if k != 200),
        "rss_mib_before": before,
        "rss_mib_after": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", action="store_true")
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    server, port = serve(args.teacher)
    started = time.perf_counter()
    results = {
        "model": "SmolLM2-135M" if args.teacher else "tiny (teacher's tokenizer)",
        "fuzz": fuzz(port, args.requests),
        "abandoned_streams": abandoned_streams(port),
    }
    results["load"] = load(port, args.seconds)
    results["seconds"] = time.perf_counter() - started
    server.should_exit = True
    (HERE / "results_serve_hostile.json").write_text(json.dumps(results, indent=1) + "\n")
    f, a, lo = results["fuzz"], results["abandoned_streams"], results["load"]
    fives = sum(v for k, v in f["statuses"].items() if k.isdigit() and int(k) >= 500)
    lines = [
        f"`python bench/serve_hostile.py{' --teacher' if args.teacher else ''}` "
        f"({results['model']}, {results['seconds']:.0f} s)",
        "",
        "| check | result |",
        "|---|---|",
        f"| fuzzed requests | {f['requests']}: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(f["statuses"].items()))
        + f"; ≥ 500: {fives}; /health failures after them: {f['health_failures']} |",
        f"| 50 abandoned streams, then 1 token | {a['next_request_s'] * 1000:.0f} ms (idle "
        f"server: {a['idle_request_s'] * 1000:.0f} ms): {a['excess_steps']:.1f} decoding steps "
        f"more ({a['decoding_step_s'] * 1000:.1f} ms each) |",
        f"| {lo['clients']} clients for {lo['seconds']:.0f} s | "
        + ", ".join(f"{k}: {v}" for k, v in lo["answers"].items())
        + f"; failures {lo['failures']}; RSS {lo['rss_mib_before']:.0f} → "
        f"{lo['rss_mib_after']:.0f} MiB |",
    ]
    (HERE / "results_serve_hostile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
