"""The README's examples, run exactly as written. The own-model one runs (in a scratch
folder, with the installed ``cmiguard`` on the PATH); only the server gets a
free port, and the test asks it one question with the openai client."""

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent


def example() -> str:
    """The bash block after the ``provider-example`` marker."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- provider-example -->\s*```bash\n(.*?)```", text, re.S)
    assert match, "the README lost its provider-example block"
    return match.group(1)


def test_the_readme_example_runs_as_written(tmp_path, teacher):
    script = example()
    assert script.rstrip().endswith("&") and "cmiguard serve" in script.splitlines()[-1]
    *steps, serve = script.rstrip().splitlines()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "runs").mkdir()
    run = subprocess.run(
        ["bash", "-e", "-c", "\n".join(steps)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for made in ("my-model/config.json", "my-transform/transform.safetensors",
                 "my-evaluation/evaluation.json", "my-folded/config.json"):  # fmt: skip
        assert (tmp_path / "runs" / made).is_file(), made
    server = subprocess.Popen(
        ["bash", "-c", serve.removesuffix("&").strip() + f" --port {port}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for _ in range(600):
            # a server that died is said at once, with why (not after 600 polls)
            assert server.poll() is None, f"the README's server exited: {server.stderr.read()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        # greedy: sampled at the default temperature 1, an early end-of-text
        # token would leave fewer than 3 tokens now and then
        reply = client.completions.create(
            model="my-model",
            prompt="The parcel for order 3 left",
            max_tokens=3,
            logprobs=2,
            temperature=0,
        )
        assert reply.choices[0].finish_reason == "length"
        assert reply.choices[0].text and len(reply.choices[0].logprobs.top_logprobs) == 3
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already if it died
            os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_the_readme_python_api_runs_as_written(tmp_path, monkeypatch):
    """The Python API block, run as written (it loads the teacher itself);
    then its results are checked."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- python-api -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the README lost its python-api block"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), ns)
    torch, cmiguard = ns["torch"], ns["cmiguard"]
    logits, labels, t = ns["logits"], ns["labels"], ns["t"]
    assert ns["purified"].shape == logits.shape and ns["purified"].dtype == logits.dtype
    torch.testing.assert_close(ns["purified"], logits)  # identity at init
    values, ids = logits.log_softmax(-1).topk(20)
    torch.testing.assert_close(ns["top_values"], values)
    assert torch.equal(ns["top_ids"], ids)
    assert len(set(labels.tolist())) < len(labels)  # " sat", " on", " the" repeat
    assert 0 < float(ns["nats"]) < 10
    grads = [p.grad for p in t.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)
    for mine, read in zip(t.parameters(), ns["loaded"].parameters(), strict=True):
        assert torch.equal(mine.detach(), read)
    with torch.no_grad():
        folded = ns["model"](**ns["batch"]).logits[0, :-1]
    torch.testing.assert_close(folded, cmiguard.purify(logits, ns["loaded"]), atol=1e-4, rtol=1e-4)
