"""Throughput of ``cmiguard serve`` with the transform applied per step, with a
folded model, and unprotected, under the same concurrent load.

    python bench/serve_overhead.py [--teacher] [--clients 32] [--requests 96]

Each mode runs its own server in this process on 127.0.0.1; clients are the
real openai client in threads. Prints a markdown table of completion tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import uvicorn

from cmiguard import LowRankTransform, fold_into_lm_head
from cmiguard.serve.server import ServerConfig, create_app
from cmiguard.train.models import load_teacher, tiny_model


def serve(model, tokenizer, transform):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig("m", max_new_tokens=64, max_batch=32)
    app = create_app(model, tokenizer, transform, config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def load(url: str, clients: int, requests: int, tokens: int) -> tuple[float, int]:
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=300)

    def ask(i):
        out = client.completions.create(
            model="m", prompt=f"Item {i}: the", max_tokens=tokens, logprobs=5, temperature=0
        )
        return out.usage.completion_tokens

    ask(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(ask, range(requests)))
    return sum(done) / (time.perf_counter() - start), len(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--teacher", action="store_true", help="SmolLM2-135M instead of a tiny model"
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    teacher, tokenizer = load_teacher()
    model = teacher if args.teacher else tiny_model(teacher.config.vocab_size)
    transform = LowRankTransform(model.config.vocab_size, 32, temperature=3.0)
    folded = fold_into_lm_head(copy.deepcopy(model), transform)
    rows = []
    for mode, m, t in [
        ("unprotected", model, None),
        ("transform per step", model, transform),
        ("folded", folded, None),
    ]:
        server, url = serve(m, tokenizer, t)
        rate, n = load(url, args.clients, args.requests, args.tokens)
        server.should_exit = True
        rows.append((mode, rate, n))
    base = rows[0][1]
    print(
        f"model: {'SmolLM2-135M' if args.teacher else 'tiny 2-layer'}; {args.clients} clients, "
        f"{args.requests} requests x {args.tokens} tokens, CPU\n"
    )
    print("| mode | completion tokens/s | overhead vs unprotected | requests ok |")
    print("|---|---|---|---|")
    for mode, rate, n in rows:
        print(f"| {mode} | {rate:.1f} | {(base - rate) / base:+.1%} | {n}/{args.requests} |")


if __name__ == "__main__":
    main()
