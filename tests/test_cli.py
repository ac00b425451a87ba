import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cmiguard import LowRankTransform, purify, save_transform
from cmiguard.cli import main
from cmiguard.cli.options import folder
from tests.conftest import random_logits, trained_like


@pytest.fixture
def transform_file(tmp_path):
    t = trained_like(LowRankTransform(300, 4, temperature=1.3), scale=0.01)
    path = tmp_path / "t.safetensors"
    save_transform(t, path)
    return t, path


def test_version_names_the_package_and_what_a_bug_report_needs(capsys):
    import re
    from pathlib import Path

    import cmiguard

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    (declared,) = re.findall(r'^version = "(.+)"$', pyproject, re.M)
    assert cmiguard.__version__ == declared
    out = capsys.readouterr().out
    assert out.startswith(f"cmiguard {declared} (torch {torch.__version__}, triton ")
    assert "transformers " in out


def test_purify_streams_npy_and_safetensors(tmp_path, transform_file):
    t, tpath = transform_file
    z1, z2 = random_logits(37, 300, seed=1), random_logits(5, 300, seed=2).half()
    np.save(tmp_path / "a.npy", z1.numpy())
    save_file({"logits": z2}, tmp_path / "b.safetensors")
    out = tmp_path / "out"
    args = [str(tmp_path / "a.npy"), str(tmp_path / "b.safetensors"), "--transform", str(tpath)]
    assert (
        main(["purify", *args, "--out", str(out), "--block-rows", "8", "--output", "logprobs"]) == 0
    )
    got1 = torch.from_numpy(np.load(out / "a.npy"))
    torch.testing.assert_close(got1, purify(z1, t, output="logprobs"))
    got2 = load_file(out / "b.safetensors")["logits"]
    assert got2.dtype == torch.float16
    torch.testing.assert_close(got2, purify(z2, t, output="logprobs"))


def test_purify_top_k(tmp_path, transform_file, capsys):
    t, tpath = transform_file
    z = random_logits(11, 300)
    save_file({"logits": z}, tmp_path / "z.safetensors")
    out = tmp_path / "out"
    argv = ["purify", str(tmp_path / "z.safetensors"), "--transform", str(tpath), "--out", str(out)]
    assert main([*argv, "--top-k", "5", "--output", "logprobs", "--block-rows", "4"]) == 0
    got = load_file(out / "z.safetensors")
    values, ids = purify(z, t, output="logprobs", top_k=5)
    torch.testing.assert_close(got["values"], values)
    assert torch.equal(got["ids"], ids)
    # a .npy shard's top-k go to NAME.safetensors (one .npy holds one array); an empty shard
    # gives empty [0, k] tensors; a k over the vocabulary is refused before anything is written
    np.save(tmp_path / "y.npy", z.numpy())
    np.save(tmp_path / "empty.npy", np.zeros((0, 300), dtype=np.float32))
    npys = [str(tmp_path / "y.npy"), str(tmp_path / "empty.npy")]
    argv = ["purify", *npys, "--transform", str(tpath), "--top-k", "5", "--output", "logprobs"]
    assert main([*argv, "--out", str(tmp_path / "npy")]) == 0
    got = load_file(tmp_path / "npy" / "y.safetensors")
    torch.testing.assert_close(got["values"], values)
    assert torch.equal(got["ids"], ids)
    empty = load_file(tmp_path / "npy" / "empty.safetensors")
    assert empty["values"].shape == empty["ids"].shape == (0, 5)
    assert main([*argv[:-4], "--top-k", "301", "--out", str(tmp_path / "big")]) == 2
    assert "top_k must be in [1, 300], got 301" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def test_purify_runs_on_the_device_asked_for(tmp_path, transform_file, capsys):
    t, tpath = transform_file
    z = random_logits(9, 300)
    save_file({"logits": z}, tmp_path / "z.safetensors")
    argv = ["purify", str(tmp_path / "z.safetensors"), "--transform", str(tpath), "--out"]
    assert main([*argv, str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    on_cpu = load_file(tmp_path / "cpu" / "z.safetensors")["logits"]
    torch.testing.assert_close(on_cpu, purify(z, t))
    gpu = main([*argv, str(tmp_path / "gpu"), "--device", "cuda"])
    if torch.cuda.is_available():  # the fused kernels, against the CPU twin
        assert gpu == 0
        on_gpu = load_file(tmp_path / "gpu" / "z.safetensors")["logits"]
        torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)
    else:
        assert gpu == 2 and "CUDA is not available" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "x"), "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a device" in capsys.readouterr().err
    # a device no path here runs on, or a GPU the machine lacks: named, not a traceback
    for device, says in (
        ("meta", "--device meta: cmiguard runs on cpu or cuda"),
        ("mps", "--device mps: cmiguard runs on cpu or cuda"),
        ("cuda:7", "--device cuda:7: " + (
            "this machine has" if torch.cuda.is_available() else "CUDA is not available"
        )),
    ):  # fmt: skip
        assert main([*argv, str(tmp_path / "x"), "--device", device]) == 2
        assert says in capsys.readouterr().err


def test_purify_refuses_log_prob_shards_unless_asked(tmp_path, transform_file, capsys):
    """Stored log-probs are not logits: the map is not shift-invariant, so
    purifying them gives another distribution than purifying the logits."""
    t, tpath = transform_file
    z = random_logits(6, 300, seed=3) * 4
    log_p = torch.log_softmax(z, dim=-1)
    differ = purify(log_p, t, output="logprobs") - purify(z, t, output="logprobs")
    assert differ.abs().max() > 1e-3  # why it is refused: another map
    np.save(tmp_path / "logits.npy", z.numpy())
    save_file({"logits": log_p.half()}, tmp_path / "logp.safetensors")
    shards = [str(tmp_path / "logits.npy"), str(tmp_path / "logp.safetensors")]
    argv = ["purify", *shards, "--transform", str(tpath), "--block-rows", "4", "--out"]
    assert main([*argv, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        "logp.safetensors: every row's logsumexp is at most 0: these are log-probabilities" in err
    )
    assert "pass --allow-log-probs to purify these anyway" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert main([*argv, str(tmp_path / "ok"), "--allow-log-probs"]) == 0
    got = load_file(tmp_path / "ok" / "logp.safetensors")["logits"]
    torch.testing.assert_close(got, purify(log_p.half(), t))


def test_purify_errors_are_clear(tmp_path, transform_file, capsys):
    _, tpath = transform_file
    np.save(tmp_path / "good.npy", np.zeros((3, 300), dtype=np.float32))
    np.save(tmp_path / "wrong.npy", np.zeros((3, 299), dtype=np.float32))
    out = tmp_path / "out"
    shards = [str(tmp_path / "good.npy"), str(tmp_path / "wrong.npy")]
    assert main(["purify", *shards, "--transform", str(tpath), "--out", str(out)]) == 2
    assert "wrong.npy has vocab 299" in capsys.readouterr().err
    # every shard is checked before the first is written
    assert not out.exists() or not any(out.iterdir())
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00")
    assert (
        main(
            [
                "purify",
                str(tmp_path / "bad.safetensors"),
                "--transform",
                str(tpath),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "truncated" in capsys.readouterr().err
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(tpath.read_bytes()[:100])
    assert (
        main(
            [
                "purify",
                str(tmp_path / "wrong.npy"),
                "--transform",
                str(truncated),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "truncated or corrupt" in capsys.readouterr().err
    # outputs that would overwrite an input, or each other
    before = (tmp_path / "good.npy").read_bytes()
    assert main(["purify", shards[0], "--transform", str(tpath), "--out", str(tmp_path)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert (tmp_path / "good.npy").read_bytes() == before
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b" / "good.npy", np.zeros((3, 300), dtype=np.float32))
    twice = [shards[0], str(tmp_path / "b" / "good.npy")]
    assert main(["purify", *twice, "--transform", str(tpath), "--out", str(out)]) == 2
    assert "inputs would share output names ['good.npy']" in capsys.readouterr().err
    # a NaN deep in a shard is named by file and rows; that shard's output is not left half-written
    bad = np.zeros((10, 300), dtype=np.float32)
    bad[7, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    argv = [str(tmp_path / "nan.npy"), "--transform", str(tpath), "--block-rows", "4"]
    assert main(["purify", *argv, "--out", str(tmp_path / "n")]) == 2
    assert f"{tmp_path / 'nan.npy'}, rows 4-7: logits contain NaN" in capsys.readouterr().err
    assert not (tmp_path / "n" / "nan.npy").exists()
    # numpy's default float64, named by file before anything is written (it was torch's
    # dtype error, with no file)
    np.save(tmp_path / "f64.npy", np.zeros((3, 300)))
    f64 = [str(tmp_path / "f64.npy"), "--transform", str(tpath), "--out", str(tmp_path / "d")]
    assert main(["purify", *f64]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'f64.npy'} holds torch.float64 logits; purify takes float32" in err
    assert not (tmp_path / "d").exists()
    # a big-endian array (">f4", as some writers save) is read, not refused by torch unnamed
    logits = np.random.default_rng(0).standard_normal((5, 300)).astype(np.float32)
    np.save(tmp_path / "native.npy", logits)
    np.save(tmp_path / "big.npy", logits.astype(">f4"))
    both = [str(tmp_path / "native.npy"), str(tmp_path / "big.npy")]
    assert main(["purify", *both, "--transform", str(tpath), "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    assert np.array_equal(np.load(tmp_path / "e" / "big.npy"), np.load(tmp_path / "e/native.npy"))
    np.save(tmp_path / "words.npy", np.array([["a", "b"]]))
    words = [str(tmp_path / "words.npy"), "--transform", str(tpath), "--out", str(tmp_path / "d")]
    assert main(["purify", *words]) == 2
    assert f"{tmp_path / 'words.npy'} holds <U1 values, not logits" in capsys.readouterr().err
    # a 0 that would read as 'off' (top-k) or fail deep inside (block rows): refused up front
    purify = ["purify", shards[0], "--transform", str(tpath), "--out", str(out)]
    for flag, value, says in (
        ("--top-k", "0", "--top-k: must be >= 1, got 0"),
        ("--block-rows", "0", "--block-rows: must be >= 1, got 0"),
        ("--temperature", "nan", "--temperature: must be a finite number > 0, got nan"),
    ):
        with pytest.raises(SystemExit):
            main([*purify, flag, value])
        assert says in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.teacher
def test_train_resume_from_the_command_line(tmp_path, teacher):
    base = [sys.executable, "-m", "cmiguard.cli", "train", "--objective", "cmi", "--articles", "3"]
    base += [
        "--questions",
        "5",
        "--validation-articles",
        "1",
        "--max-tokens",
        "16",
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--lr",
        "1e-5",
        "--epochs",
        "1",
    ]
    first = subprocess.run(
        [*base, "--out", str(tmp_path / "a"), "--stop-after", "2", "--resume"],
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr
    assert f"no checkpoint in {tmp_path / 'a'}: starting a new run" in first.stderr
    again = subprocess.run([*base, "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert again.returncode == 2  # without --resume the run is not overwritten
    assert "holds a training run (checkpoint.pt): --resume continues it" in again.stderr
    resumed = subprocess.run(
        [*base, "--out", str(tmp_path / "a"), "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([*base, "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    a, b = (
        load_file(tmp_path / "a" / "transform.safetensors"),
        load_file(tmp_path / "b" / "transform.safetensors"),
    )
    assert json.loads(resumed.stdout)["steps"] == json.loads(whole.stdout)["steps"] == 4
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.teacher
def test_demo_end_to_end(teacher):
    """The embedded default on a small slice: the constraints hold on held-out rows."""
    cmd = [sys.executable, "-m", "cmiguard.cli", "demo", "--json", "--articles", "8"]
    cmd += [
        "--heldout-articles",
        "4",
        "--epochs",
        "1",
        "--questions",
        "20",
        "--surrogate-steps",
        "8",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout)
    assert m["temperature"] == 1.0  # served at τ = 1: no temperature hides behind the numbers
    assert m["top1_agreement"] >= 0.99
    assert m["teacher_accuracy_purified"] >= m["teacher_accuracy_raw"] - 0.01
    assert m["teacher_accuracy_raw"] > 0.5  # the cloze multiple choice is far above chance
    assert 0 < m["misalignment_cos_heldout"] < 1
    # re-tempering a τ = 1 output changes little: its CMI is close to what is served
    assert m["cmi_purified_retempered"] == pytest.approx(m["cmi_purified"], rel=0.2)


@pytest.mark.teacher
def test_evaluate_on_the_real_teacher_writes_the_report_and_resumes(tmp_path, teacher, capsys):
    from cmiguard.checkpoint import vocab_fingerprint

    model, tokenizer = teacher
    transform = LowRankTransform(model.config.vocab_size, 4, temperature=2.0)  # τ alone
    save_transform(transform, tmp_path / "t.safetensors", vocab_fingerprint(tokenizer))
    argv = ["evaluate", "--transform", str(tmp_path / "t.safetensors"), "--out", str(tmp_path)]
    argv += ["--articles", "2", "--heldout-articles", "1", "--steps", "2", "--json"]
    assert main([*argv, "--attacks", "forward_kl", "--defenses", "no_defense,cmiguard"]) == 0
    first = json.loads(capsys.readouterr().out)
    other = LowRankTransform(model.config.vocab_size, 4, temperature=3.0)
    save_transform(other, tmp_path / "hot.safetensors", vocab_fingerprint(tokenizer))
    more = [
        "--attacks",
        "forward_kl,adaptive_retemper",
        "--defenses",
        "no_defense,cmiguard,noise@1",
    ]
    more += ["--cmiguard", f"hot={tmp_path / 'hot.safetensors'}"]
    assert main([*argv, *more]) == 0  # adds cells
    second = json.loads(capsys.readouterr().out)
    assert second["attacks"]["forward_kl"]["cmiguard"] == first["attacks"]["forward_kl"]["cmiguard"]
    assert list(second["attacks"]["adaptive_retemper"]) == [
        "no_defense",
        "cmiguard",
        "noise@1",
        "cmiguard@hot",
    ]
    # the blind attacker reads the served temperature off the miscalibration
    taus = second["fitted_temperature"]["adaptive_retemper"]
    assert taus["cmiguard"] == pytest.approx(2 * taus["no_defense"], rel=0.05)
    assert taus["cmiguard@hot"] == pytest.approx(3 * taus["no_defense"], rel=0.05)
    assert second["teacher_accuracy"]["cmiguard"] == second["teacher_accuracy_raw"]
    assert (tmp_path / "evaluation.png").stat().st_size > 10_000
    assert main([*argv, "--defenses", "soften@0.5"]) == 2  # named before any student trains
    assert "the soften knob must be > 1" in capsys.readouterr().err


def test_serve_app_from_the_command_line(tmp_path, teacher, monkeypatch):
    """``cmiguard serve``'s app: a saved model, a transform file, --temperature, --no-echo."""
    from fastapi.testclient import TestClient

    from cmiguard import vocab_fingerprint
    from cmiguard.cli import build_parser
    from cmiguard.cli.serve import serve_app
    from cmiguard.train.models import tiny_model

    tokenizer = teacher[1]
    model = tiny_model(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    t = trained_like(LowRankTransform(len(tokenizer), 4, temperature=3.0), scale=0.5)
    save_transform(t, tmp_path / "t.safetensors", vocab_fingerprint(tokenizer))
    argv = [
        "serve",
        "--model",
        str(tmp_path / "model"),
        "--transform",
        str(tmp_path / "t.safetensors"),
    ]
    ids = tokenizer.encode("The capital of France is", add_special_tokens=False)
    body = {"model": "smollm2-135m-cmiguard", "prompt": ids, "max_tokens": 0, "echo": True}
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    nxt = torch.tensor(ids[1:])[:, None]
    for extra, tau in (([], 3.0), (["--temperature", "1"], 1.0)):
        app = serve_app(build_parser().parse_args([*argv, "--device", "cpu", *extra]))
        with TestClient(app) as http:
            got = http.post("/v1/completions", json=body | {"logprobs": 1}).json()
        want = purify(logits, t, temperature=tau, output="logprobs").gather(1, nxt)[:, 0]
        served = got["choices"][0]["logprobs"]["token_logprobs"][1:]
        assert served == pytest.approx(want.tolist(), abs=1e-4)
    with TestClient(serve_app(build_parser().parse_args([*argv, "--no-echo"]))) as http:
        assert http.post("/v1/completions", json=body).status_code == 400
    assert main(["serve", "--unprotected", "--temperature", "2"]) == 2
    monkeypatch.setenv("CMIGUARD_API_KEY", "k3y")  # the key kept out of ps
    with TestClient(serve_app(build_parser().parse_args(argv))) as http:
        assert http.post("/v1/completions", json=body).status_code == 401
        key = {"Authorization": "Bearer k3y"}
        assert http.post("/v1/completions", json=body, headers=key).status_code == 200


def test_an_empty_api_key_is_refused_not_read_as_none(monkeypatch, capsys):
    """--api-key "$KEY" with KEY unset served with no key at all, silently."""
    serve = ["serve", "--unprotected", "--model", "no-model"]  # refused before it loads
    for argv, env, source in (
        (["--api-key", ""], None, "--api-key"),
        (["--api-key", "a key"], None, "--api-key"),
        ([], "", "CMIGUARD_API_KEY"),
        ([], "k3y\n", "CMIGUARD_API_KEY"),  # read from a file with its newline
    ):
        if env is None:
            monkeypatch.delenv("CMIGUARD_API_KEY", raising=False)
        else:
            monkeypatch.setenv("CMIGUARD_API_KEY", env)
        assert main([*serve, *argv]) == 2
        err = capsys.readouterr().err
        assert f"{source} is empty or holds whitespace" in err and "no-model" not in err
    # imported here, not at the top: collecting this file needs no serve extra
    # (bench/gpu.sh runs one of its tests on a GPU image that lacks pydantic)
    from cmiguard.serve.engine import ServerConfig

    with pytest.raises(ValueError, match="api_key is empty"):
        ServerConfig("tiny", api_key="")


def test_a_bad_transform_fails_before_the_model_loads(tmp_path, capsys):
    """A provider's model can take minutes to load: a wrong transform is named first."""
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00")
    model = str(tmp_path / "no-model")  # would fail too, later
    for command in (["fold", "--out", str(tmp_path / "folded")], ["serve"]):
        assert main([*command, "--model", model, "--transform", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "truncated or corrupt" in err and "no-model" not in err, command
    # evaluate's transforms, attacks and defenses: named before the model loads (and before
    # a demo transform would train for minutes)
    good = tmp_path / "good.safetensors"
    save_transform(LowRankTransform(300, 2), good)
    evaluate = ["evaluate", "--model", model, "--out", str(tmp_path / "e")]
    evaluate += ["--transform", str(good)]
    for extra, says in (
        (["--cmiguard", f"hot={bad}"], "truncated or corrupt"),
        (["--cmiguard", "hot"], "--cmiguard takes LABEL=PATH, got 'hot'"),
        (["--cmiguard", f"a,b={good}"], "--cmiguard label 'a,b' may not hold ',' or '@'"),
        (["--cmiguard", f"x={good}", "--cmiguard", f"x={bad}"], "--cmiguard x is given twice"),
        (["--defenses", "no_defense,cmiguard@hot"], "'cmiguard@hot' needs --cmiguard hot=PATH"),
        (["--attacks", "forward_kl,wasserstein"], "unknown attack wasserstein"),
    ):
        assert main([*evaluate, *extra]) == 2
        err = capsys.readouterr().err
        assert says in err and "no-model" not in err, extra
    # neither or both of --transform and --unprotected: named before the model loads
    for extra in ([], ["--unprotected", "--transform", str(bad)]):
        assert main(["serve", "--model", model, *extra]) == 2
        err = capsys.readouterr().err
        assert "pass one (a folded checkpoint" in err and "no-model" not in err, extra
    gone = str(tmp_path / "gone.safetensors")
    assert main(["fold", "--model", model, "--transform", gone, "--out", str(tmp_path / "f")]) == 2
    assert "transform file not found" in capsys.readouterr().err
    # a port in use, or no port at all: named before the model loads (uvicorn's bind came after)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", model, "--unprotected", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err
        assert "no-model" not in err
    with pytest.raises(SystemExit):
        main(["serve", "--unprotected", "--port", "70000"])
    assert "argument --port: must be in [0, 65535], got 70000" in capsys.readouterr().err


def test_serve_takes_a_chat_template_for_a_base_model(tmp_path, teacher, capsys):
    import copy

    from fastapi.testclient import TestClient

    from cmiguard.cli import build_parser
    from cmiguard.cli.serve import serve_app
    from cmiguard.train.models import tiny_model

    tokenizer = copy.deepcopy(teacher[1])
    tokenizer.chat_template = None  # a base model's tokenizer
    tiny_model(len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "plain.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "broken.jinja").write_text("{% for m in %}")
    argv = ["serve", "--model", str(tmp_path / "base"), "--unprotected", "--device", "cpu"]
    chat = {"model": "smollm2-135m-cmiguard", "messages": [{"role": "user", "content": "Hi"}]}
    for extra, status in (([], 400), (["--chat-template", str(tmp_path / "plain.jinja")], 200)):
        with TestClient(serve_app(build_parser().parse_args([*argv, *extra]))) as http:
            reply = http.post("/v1/chat/completions", json=chat | {"max_tokens": 1})
        assert reply.status_code == status, reply.text
    # the template's prompt is the message alone
    assert reply.json()["usage"]["prompt_tokens"] == len(tokenizer.encode("Hi"))
    assert main([*argv, "--chat-template", str(tmp_path / "broken.jinja")]) == 2
    assert "broken.jinja does not render a message" in capsys.readouterr().err
    assert main([*argv, "--chat-template", str(tmp_path / "gone.jinja")]) == 2
    assert "gone.jinja: no such file" in capsys.readouterr().err


def test_every_option_says_what_it_does_and_its_default(capsys):
    """--help is where a newcomer looks: each option has a text, and the
    defaults it shows are the ones the parser uses."""
    import argparse

    from cmiguard.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        silent = [a.dest for a in parser._actions if not a.help]
        assert not silent, f"{name}: {silent}"
    with pytest.raises(SystemExit):
        main(["purify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "rows read, purified and written at a time (default: 1024)" in text
    assert "in place of the transform's own" in text and "(default: None)" not in text
    with pytest.raises(SystemExit):  # a flag's default would read as the flag being on
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "teacher-forced) --chat-template" in text and "(default: True)" not in text
    # a count of 0 trains or scores nothing: refused by name before any model loads
    for argv in (["evaluate", "--steps", "0"], ["train", "--out", "x", "--epochs", "0"],
                 ["demo", "--heldout-articles", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
        assert f"argument {argv[-2]}: must be >= 1, got 0" in capsys.readouterr().err
    # a negative count sliced rows off the end; one question left no validation question
    for argv, minimum in ((["train", "--out", "x", "--validation-articles", "-1"], 0),
                          (["train", "--out", "x", "--questions", "1"], 2),
                          (["demo", "--questions", "-1"], 2)):  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert f"argument {argv[-2]}: must be >= {minimum}, got {argv[-1]}" in err
    for command in (["train", "--out", "x"], ["evaluate"]):  # a missing --data, named at once
        with pytest.raises(SystemExit):
            main([*command, "--data", "nope.jsonl"])
        assert "argument --data: no such file or directory: nope.jsonl" in capsys.readouterr().err


def test_train_starts_each_family_as_it_can(capsys):
    """The low-rank start (init_scale 1e-6) was applied to dense too, so
    `cmiguard train --family dense` was refused for options nobody gave."""
    from cmiguard.cli import build_parser
    from cmiguard.cli.train import _config

    def config(*argv):
        return _config(build_parser().parse_args(["train", "--out", "x", *argv]))

    dense = config("--family", "dense")
    assert (dense.family, dense.init, dense.init_scale) == ("dense", "lora", 0.0)
    low = config()
    assert (low.init, low.init_scale) == ("lora", 1e-6)
    assert config("--init", "seed", "--init-scale", "0").init_scale == 0.0
    assert config("--centered").centered
    with pytest.raises(ValueError, match="not for dense"):
        config("--family", "dense", "--init-scale", "0.1")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "random start of the zero factor (default: 1e-06)" in text


def test_an_output_folder_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    """train and demo used to train, then fail on mkdir with a traceback."""
    taken = tmp_path / "taken"
    taken.write_text("someone's notes")
    commands = [["train"], ["evaluate"], ["demo"], ["fold", "--transform", "t"]]
    commands += [["purify", "--transform", "t", "x.npy"]]
    for command in commands:
        for out in (taken, taken / "below"):
            with pytest.raises(SystemExit):
                main([*command, "--out", str(out)])
            assert f"argument --out: {taken} exists and is not a directory" in (
                capsys.readouterr().err
            )
    with pytest.raises(SystemExit):
        main(["export-teacher", str(taken)])
    assert "argument out: " in capsys.readouterr().err
    assert taken.read_text() == "someone's notes"
    assert folder(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")


def test_fold_never_overwrites_what_it_would_not_rewrite(tmp_path, teacher, capsys):
    """fold into the model's own folder, or into a folder holding other files,
    is refused and leaves it as it was; into its own last output it reruns."""
    from cmiguard import vocab_fingerprint
    from cmiguard.train.models import tiny_model

    tokenizer = teacher[1]
    model_dir = tmp_path / "model"
    tiny_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    t = tmp_path / "t.safetensors"
    save_transform(LowRankTransform(len(tokenizer), 4), t, vocab_fingerprint(tokenizer))
    fold = ["fold", "--model", str(model_dir), "--transform", str(t), "--out"]
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert main([*fold, str(model_dir)]) == 2
    assert "is the model's own directory" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main([*fold, str(mine)]) == 2
    assert "holds files the new directory would not have (notes.txt)" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert main([*fold, str(tmp_path / "folded")]) == 0
    assert main([*fold, str(tmp_path / "folded")]) == 0  # a rerun replaces its own output
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
