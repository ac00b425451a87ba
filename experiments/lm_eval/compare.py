"""What an honest user of the logprobs API loses: lm-evaluation-harness's
log-likelihood scoring of the held-out capital questions, through
``cmiguard serve``, raw vs purified (and the purification's two parts).

    python experiments/lm_eval/compare.py --lm-eval /tmp/lmenv/bin/lm_eval

lm-eval is not a dependency of cmiguard (it is large): install it in its own
environment, ``python -m venv /tmp/lmenv && /tmp/lmenv/bin/pip install
'lm-eval[api]' transformers``. Each variant runs its own server on
127.0.0.1; lm-eval scores each question's four capitals by the summed
log-probs of their tokens (``acc``) and per byte (``acc_norm``), sending
token ids with ``echo=true, max_tokens=0``. The questions are written to
``capitals.jsonl`` first (from the data wheel, not kept in git), the task is
``capitals.yaml``. Writes ``results.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from cmiguard.checkpoint import load_transform, read_metadata, save_transform
from cmiguard.train.data import capital_choices
from cmiguard.train.models import cache_dir
from cmiguard.transforms import make_transform

HERE = Path(__file__).parent


def export_questions(path: Path) -> int:
    """The held-out capital questions, as ``cmiguard evaluate`` scores them
    (:func:`cmiguard.train.data.capital_choices`). Returns how many."""
    items = capital_choices("heldout")
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return len(items)


def variants(transform: Path, scratch: Path, taus: list[float]) -> dict[str, list[str]]:
    """``cmiguard serve`` arguments of each variant, by name: softening (no
    learned map) at each of ``taus`` and at the transform's own temperature."""
    soften = scratch / "soften.safetensors"
    t = load_transform(transform)
    identity = make_transform(t.family, t.vocab_size, t.rank, temperature=t.temperature)
    save_transform(identity, soften, read_metadata(transform)["vocab_fingerprint"])
    out = {
        "no_defense": ["--unprotected"],
        "cmiguard": ["--transform", str(transform)],
        f"learned map only (τ = 1, not {t.temperature:.2f})": [
            "--transform",
            str(transform),
            "--temperature",
            "1",
        ],
    }
    for tau in sorted({*taus, t.temperature}):
        out[f"soften (τ = {tau:.2f} only)"] = [
            "--transform",
            str(soften),
            "--temperature",
            str(tau),
        ]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def score(lm_eval: str, serve_args: list[str], out: Path) -> dict[str, float]:
    """One variant: start its server, run lm-eval against it, read its results."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cmiguard.cli", "serve", *serve_args, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/models").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"cmiguard serve {' '.join(serve_args)} did not start")
        model_args = ",".join(
            [
                "model=smollm2-135m-cmiguard",
                f"base_url={url}/completions",
                "num_concurrent=1",
                "max_retries=1",
                "tokenized_requests=True",
                f"tokenizer={cache_dir() / 'smollm2-135m-instruct'}",
            ]
        )
        command = [lm_eval, "--model", "local-completions", "--model_args", model_args]
        command += ["--batch_size", "8", "--tasks", "capitals", "--include_path", str(HERE)]
        command += ["--output_path", str(out)]
        env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    finally:
        server.terminate()
        server.wait()
    (found,) = out.rglob("results_*.json")
    result = json.loads(found.read_text())["results"]["capitals"]
    return {k.removesuffix(",none"): v for k, v in result.items() if k.endswith(",none")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm-eval", required=True, help="the lm_eval command")
    parser.add_argument("--transform", type=Path, default=Path("runs/demo/transform.safetensors"))
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument(
        "--soften", default="1.5,2,10", help="more temperatures to serve softening at (comma list)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    questions = export_questions(HERE / "capitals.jsonl")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        taus = [float(x) for x in args.soften.split(",") if x]
        for name, serve_args in tqdm(variants(args.transform, Path(scratch), taus).items()):
            results[name] = score(args.lm_eval, serve_args, Path(scratch) / str(len(results)))
    rows = [
        f"| {name} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} "
        f"| {r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f} |"
        for name, r in results.items()
    ]
    table = "\n".join(
        [
            f"lm-evaluation-harness, task `capitals` ({questions} held-out questions, "
            f"4 options), served by `cmiguard serve`, {time.perf_counter() - start:.0f} s",
            "",
            "| served | acc (sum of log-probs) | acc_norm (per byte) |",
            "|---|---|---|",
            *rows,
        ]
    )
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
