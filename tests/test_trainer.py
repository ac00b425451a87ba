import json

import pytest
import torch

from cmiguard.train.data import Example
from cmiguard.train.models import tiny_model
from cmiguard.train.trainer import TrainConfig, train


def tiny_examples(n=10, v=96, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 12, (length,), generator=gen).tolist()  # few labels: they repeat
        out.append(Example(ids, list(range(length - 1)), ids[1:]))
    return out


@pytest.mark.parametrize("objective", ["cmi", "paper"])
def test_resume_reaches_the_same_transform(tmp_path, objective):
    teacher, surrogate = tiny_model(96, seed=0), tiny_model(96, seed=1)
    config = TrainConfig(
        objective=objective,
        rank=4,
        epochs=2,
        batch_size=3,
        lr=1e-3,
        checkpoint_every=2,
        select_every=3,
        utility="teacher_ce",
        init_scale=0.01,
        guard_margin=0.5,
    )
    examples, validation = tiny_examples(), tiny_examples(4, seed=5)

    def run(out=None, **kwargs):
        return train(
            config, teacher, examples, 0, surrogate, out, progress=False, validation=validation,
            **kwargs,
        )  # fmt: skip

    whole = run()
    stopped = run(tmp_path, stop_after=5)
    assert len(stopped.history) == 5
    with pytest.raises(ValueError, match="other training or validation rows"):
        train(config, teacher, tiny_examples(seed=2), 0, surrogate, tmp_path, resume=True,
              progress=False, validation=validation)  # fmt: skip
    resumed = run(tmp_path, resume=True)
    assert resumed.resumed_from == 5 and len(resumed.history) == len(whole.history) == 8
    assert [s["step"] for s in resumed.selections] == [0, 3, 6, 8]
    # (json: the cmi objective has no cosine, NaN, which == would call unequal)
    assert json.dumps(resumed.selections) == json.dumps(whole.selections)
    assert resumed.selected_step == whole.selected_step
    for a, b in zip(whole.transform.parameters(), resumed.transform.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(whole.transform.b, torch.zeros_like(whole.transform.b))
    # the files: the selected transform, the last, one per selection point, the log and plot
    for name in ("transform", "last", "trajectory/step0", "trajectory/step3", "trajectory/step8"):
        assert (tmp_path / f"{name}.safetensors").is_file(), name
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "step"] == list(range(1, 9))
    steps = [r for r in log if r["kind"] == "step"]
    assert all(r["top1"] == 1.0 for r in steps)  # the guard keeps every answer
    assert {"utility", "distance", "lr"} <= set(steps[0])
    if objective == "paper":
        assert 0 < steps[0]["cos_heldout"] < 1 and 0 < steps[0]["cos"] < 1
    assert (tmp_path / "training.png").stat().st_size > 10_000


def test_training_lowers_the_cmi_objective():
    teacher = tiny_model(96, seed=0)
    config = TrainConfig(objective="cmi", rank=8, epochs=6, batch_size=5, lr=3e-3, lambda_ce=0.1)
    result = train(config, teacher, tiny_examples(), 0, progress=False)
    first = sum(h["cmi"] for h in result.history[:2]) / 2
    last = sum(h["cmi"] for h in result.history[-2:]) / 2
    assert last < 0.8 * first


def test_streaming_estimator_trains_and_resumes(tmp_path):
    teacher = tiny_model(96, seed=0)
    config = TrainConfig(
        objective="cmi", estimator="streaming", rank=2, batch_size=4, lr=1e-3, checkpoint_every=1
    )
    whole = train(config, teacher, tiny_examples(), 0, progress=False)
    train(config, teacher, tiny_examples(), 0, out_dir=tmp_path, progress=False, stop_after=2)
    resumed = train(
        config, teacher, tiny_examples(), 0, out_dir=tmp_path, resume=True, progress=False
    )
    torch.testing.assert_close(whole.transform.b, resumed.transform.b, rtol=0, atol=0)


def test_bad_training_input():
    teacher = tiny_model(96)
    with pytest.raises(ValueError, match="empty"):
        train(TrainConfig(objective="cmi"), teacher, [], 0, progress=False)
    with pytest.raises(ValueError, match="surrogate"):
        train(TrainConfig(objective="paper"), teacher, tiny_examples(), 0, progress=False)
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="adversarial")
    with pytest.raises(ValueError, match="utility must be one of"):
        TrainConfig(utility="accuracy")
    with pytest.raises(ValueError, match="not for dense"):
        TrainConfig(family="dense", init="seed")
    # a dense transform of SmolLM2's vocabulary would be 9 GiB: refused, not allocated
    with pytest.raises(ValueError, match=r"49,152² weights \(9.0 GiB in fp32\)"):
        train(TrainConfig(objective="cmi", family="dense"), tiny_model(49_152), tiny_examples(), 0)
    for bad in ({"epochs": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="epochs and batch_size must be >= 1"):
            TrainConfig(**bad)
    for bad in ({"select_every": -1}, {"cos_warmup": -1}, {"checkpoint_every": 0}):
        with pytest.raises(ValueError, match="select_every and cos_warmup must be >= 0"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match=r"warmup is a share of the steps in \[0, 1\), got 1.5"):
        TrainConfig(warmup=1.5)
    # a NaN weight trained a NaN loss and reported success
    for name, value in (("lam", float("nan")), ("lambda_cmi", float("inf")), ("lambda_kl", -1.0)):
        with pytest.raises(ValueError, match=f"{name} must be a finite weight >= 0, got {value}"):
            TrainConfig(**{name: value})


def test_a_diverged_run_is_said_to_have_diverged():
    # it failed with "logits contain +inf", as if the teacher's logits were bad
    config = TrainConfig(objective="cmi", rank=4, batch_size=5, lr=1e30, init_scale=0.1)
    with pytest.raises(ValueError, match="training diverged: .* not finite \\(lower --lr\\)"):
        train(config, tiny_model(96, seed=0), tiny_examples(), 0, progress=False)


def test_resume_with_other_settings_is_refused(tmp_path):
    teacher = tiny_model(96)

    def run(rank, resume):
        config = TrainConfig(objective="cmi", rank=rank)
        return train(
            config, teacher, tiny_examples(), 0, out_dir=tmp_path, resume=resume, progress=False
        )

    run(2, resume=False)
    with pytest.raises(ValueError, match=r"other settings: rank=2 \(given 3\); resume needs") as e:
        run(3, resume=True)
    assert "lr=" not in str(e.value)  # only what differs is named


def test_a_centered_run_trains_a_shift_invariant_transform_that_purifies_log_probs(tmp_path):
    """``--centered`` end to end, with bf16 factors: trained, saved, loaded and given
    stored log-probs by ``cmiguard purify`` (no --allow-log-probs needed), which
    match the logits'."""
    import numpy as np

    from cmiguard import load_transform, purify
    from cmiguard.checkpoint import load_checkpoint, save_checkpoint
    from cmiguard.cli import main

    teacher = tiny_model(96)
    config = TrainConfig(
        objective="cmi", rank=4, lr=1e-2, batch_size=5, centered=True, factor_dtype="bfloat16"
    )
    result = train(config, teacher, tiny_examples(), 0, out_dir=tmp_path, progress=False)
    moved = (result.transform.a - result.transform.a.mean(0)).bfloat16()
    assert result.transform.shift_invariant and result.transform.distance_from_identity() > 0
    loaded = load_transform(tmp_path / "transform.safetensors")
    assert loaded.shift_invariant
    torch.testing.assert_close(loaded.kernel_params()["a"], moved)
    z = torch.randn(5, 96) * 3
    np.save(tmp_path / "logp.npy", torch.log_softmax(z, -1).numpy())
    saved = str(tmp_path / "transform.safetensors")
    argv = ["purify", str(tmp_path / "logp.npy"), "--transform", saved, "--output", "logprobs"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    got = torch.from_numpy(np.load(tmp_path / "out" / "logp.npy"))
    torch.testing.assert_close(got, purify(z, loaded, output="logprobs"), rtol=1e-4, atol=1e-4)
    for family in ("diag_lowrank", "dense"):
        with pytest.raises(ValueError, match=f"centered is for the lowrank family, not {family}"):
            TrainConfig(family=family, centered=True)
    # a checkpoint written before the setting existed resumes as uncentred
    plain = TrainConfig(objective="cmi", rank=4, lr=1e-2, batch_size=5, epochs=2)
    train(plain, teacher, tiny_examples(), 0, out_dir=tmp_path / "old", progress=False,
          stop_after=1)  # fmt: skip
    state = load_checkpoint(tmp_path / "old" / "checkpoint.pt")
    del state["config"]["centered"]
    save_checkpoint(tmp_path / "old" / "checkpoint.pt", state)
    resumed = train(plain, teacher, tiny_examples(), 0, out_dir=tmp_path / "old", resume=True,
                    progress=False)  # fmt: skip
    assert resumed.resumed_from == 1 and not resumed.transform.shift_invariant


def test_training_runs_on_the_teachers_device():
    """On a GPU (bench/gpu.sh runs this compiled) the kernels train what the CPU twin does."""
    config = TrainConfig(objective="cmi", estimator="streaming", rank=4, batch_size=5, lr=3e-3)
    on_cpu = train(config, tiny_model(96, seed=0), tiny_examples(), 0, progress=False)
    assert on_cpu.transform.b.device.type == "cpu" and on_cpu.transform.b.abs().sum() > 0
    if torch.cuda.is_available():
        teacher = tiny_model(96, seed=0).cuda()
        on_gpu = train(config, teacher, tiny_examples(), 0, progress=False)
        assert on_gpu.transform.b.device.type == "cuda"
        # losses, not parameters: Adam's first steps turn rounding-level gradients into ±lr
        for key in ("loss", "cmi"):
            got, want = ([h[key] for h in r.history] for r in (on_gpu, on_cpu))
            assert got == pytest.approx(want, rel=1e-3, abs=1e-4), key
    surrogate = tiny_model(96, seed=1).to("meta")  # on another device than the teacher
    with pytest.raises(ValueError, match="surrogate is on meta"):
        train(TrainConfig(), tiny_model(96), tiny_examples(), 0, surrogate, progress=False)


def test_the_selection_rule_keeps_the_lowest_admissible_cosine(tmp_path):
    """Without a guard and with a large step the answers move: those points are
    inadmissible (top-1 agreement < 0.99) and the rule picks the lowest cosine
    among the rest; the returned transform is that point's file."""
    from cmiguard import load_transform

    teacher, surrogate = tiny_model(96, seed=0), tiny_model(96, seed=1)
    config = TrainConfig(
        objective="paper", rank=4, epochs=3, batch_size=3, lr=3e-2, select_every=1, lam=5.0
    )
    result = train(
        config, teacher, tiny_examples(), 0, surrogate, tmp_path, progress=False,
        validation=tiny_examples(4, seed=5),
    )  # fmt: skip
    points = result.selections
    assert len(points) == 13 and points[0]["step"] == 0
    assert all(not p["admissible"] for p in points if p["top1_agreement"] < 0.99)
    assert any(not p["admissible"] for p in points)  # the large steps did move answers
    admissible = [p for p in points if p["admissible"]]
    assert result.selected_step == min(admissible, key=lambda p: p["cos"])["step"]
    kept = load_transform(tmp_path / f"trajectory/step{result.selected_step}.safetensors")
    torch.testing.assert_close(kept.b, result.transform.b, rtol=0, atol=0)
    on_disk = load_transform(tmp_path / "transform.safetensors")
    torch.testing.assert_close(on_disk.b, result.transform.b, rtol=0, atol=0)


def test_admissibility_reads_the_accuracy_budget():
    """A transform that costs more than 1 point of accuracy is not admissible
    even at full top-1 agreement elsewhere; the identity is."""
    from cmiguard import LowRankTransform
    from cmiguard.train.rows import teacher_rows
    from cmiguard.train.trainer import validation_metrics

    teacher = tiny_model(96, seed=0)
    held = teacher_rows(teacher, tiny_examples(6, seed=5), 0, progress=False)
    config = TrainConfig(objective="cmi")
    identity = validation_metrics(config, LowRankTransform(96, 2), held, None)
    assert identity["admissible"] and identity["top1_agreement"] == 1.0
    assert identity["next_token_accuracy_purified"] == identity["next_token_accuracy_raw"]
    flipped = LowRankTransform(96, 2)
    with torch.no_grad():
        flipped.b.normal_(0, 10.0)  # a large random map: answers change
    scored = validation_metrics(config, flipped, held, None)
    assert scored["top1_agreement"] < 0.99 and not scored["admissible"]
