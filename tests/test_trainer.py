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
        objective=objective, rank=4, epochs=2, batch_size=3, lr=1e-3, checkpoint_every=2
    )
    examples = tiny_examples()
    whole = train(config, teacher, examples, 0, surrogate=surrogate, progress=False)
    stopped = train(config, teacher, examples, 0, surrogate, tmp_path, progress=False, stop_after=5)
    assert len(stopped.history) == 5
    resumed = train(config, teacher, examples, 0, surrogate, tmp_path, resume=True, progress=False)
    assert resumed.resumed_from == 5 and len(resumed.history) == len(whole.history) == 8
    assert (tmp_path / "transform.safetensors").is_file()
    for a, b in zip(whole.transform.parameters(), resumed.transform.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(whole.transform.b, torch.zeros_like(whole.transform.b))


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


def test_resume_with_other_settings_is_refused(tmp_path):
    teacher = tiny_model(96)

    def run(rank, resume):
        config = TrainConfig(objective="cmi", rank=rank)
        return train(
            config, teacher, tiny_examples(), 0, out_dir=tmp_path, resume=resume, progress=False
        )

    run(2, resume=False)
    with pytest.raises(ValueError, match="another configuration"):
        run(3, resume=True)


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
