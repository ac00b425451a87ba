import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cmiguard import (
    DenseTransform,
    DiagLowRankTransform,
    LowRankTransform,
    load_transform,
    save_transform,
)
from cmiguard.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from tests.conftest import random_logits, trained_like


@pytest.mark.parametrize(
    "transform",
    [
        LowRankTransform(50, 4, bias=True, temperature=2.0),
        LowRankTransform(50, 4, centered=True),
        DiagLowRankTransform(50, 3),
        DenseTransform(50),
    ],
)
def test_round_trip(tmp_path, transform):
    trained_like(transform)
    path = tmp_path / "t.safetensors"
    save_transform(transform, path, vocab_fingerprint="abc")
    loaded = load_transform(path, vocab_size=50, vocab_fingerprint="abc")
    assert type(loaded) is type(transform) and loaded.temperature == transform.temperature
    assert loaded.shift_invariant == transform.shift_invariant
    z = random_logits(4, 50)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), transform(z))


def test_other_vocabulary_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_transform(LowRankTransform(50, 2), path, vocab_fingerprint="aaaa")
    with pytest.raises(
        ValueError, match="trained for vocab_size=50, but the model has vocab_size=49152"
    ):
        load_transform(path, vocab_size=49152)
    with pytest.raises(ValueError, match="another tokenizer"):
        load_transform(path, vocab_fingerprint="bbbb")


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_transform(LowRankTransform(500, 8), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_transform(path)


def test_non_finite_weights_are_refused(tmp_path):
    transform = LowRankTransform(20, 2)
    with torch.no_grad():
        transform.a[3, 1] = float("nan")
    path = tmp_path / "t.safetensors"
    save_transform(transform, path)
    with pytest.raises(ValueError, match="tensor 'a' contains NaN or inf"):
        load_transform(path)


def _rewrite_metadata(path, **changes):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_unknown_version_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_transform(LowRankTransform(20, 2), path)
    _rewrite_metadata(path, format_version="99")
    with pytest.raises(ValueError, match="format version '99'"):
        load_transform(path)
    _rewrite_metadata(path, format="something-else")
    with pytest.raises(ValueError, match="not a cmiguard transform"):
        load_transform(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_transform(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": "8.5"}, "metadata 'rank' is '8.5', not an integer"),
        ({"vocab_size": "{"}, "metadata 'vocab_size' is '{', not an integer"),
        ({"temperature": "hot"}, "metadata 'temperature' is 'hot', not a number"),
        ({"bias": "yes"}, "metadata 'bias' is 'yes', not True or False"),
        ({"centered": "yes"}, "metadata 'centered' is 'yes', not True"),
        ({"centered": "True", "family": "dense"}, "metadata 'centered' is for lowrank, not dense"),
        ({"temperature": "0"}, r"makes no transform \(temperature must be finite and > 0"),
        ({"temperature": "inf"}, r"makes no transform \(temperature must be finite and > 0"),
        ({"rank": "0"}, r"makes no transform \(rank must be >= 1"),
    ],
)
def test_metadata_that_makes_no_transform_is_named(tmp_path, changes, message):
    # hand-edited metadata: int()'s message or a transform at temperature 0 before
    path = tmp_path / "t.safetensors"
    save_transform(LowRankTransform(20, 2), path)
    _rewrite_metadata(path, **changes)
    with pytest.raises(ValueError, match=message) as refused:
        load_transform(path)
    assert str(refused.value).startswith(str(path))


def test_integer_weights_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_transform(LowRankTransform(20, 2), path)
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file({**tensors, "b": tensors["b"].long()}, path, metadata=metadata)
    with pytest.raises(ValueError, match="tensor 'b' is torch.int64, not float"):
        load_transform(path)


def test_a_directory_is_not_overwritten_as_a_file(tmp_path):
    # os.replace failed naming a temporary file in the directory's parent
    with pytest.raises(IsADirectoryError, match=f"^{tmp_path} is a directory, not a file"):
        save_transform(LowRankTransform(20, 2), tmp_path)
    assert list(tmp_path.parent.glob(f".{tmp_path.name}.*")) == []


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "t.safetensors"
    save_transform(LowRankTransform(20, 2), path)
    before = path.read_bytes()

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_a_directory_is_replaced_only_when_nothing_in_it_would_be_lost(tmp_path):
    first, second = LowRankTransform(20, 2), trained_like(LowRankTransform(20, 2))
    target = tmp_path / "t"
    first.save_pretrained(target)
    second.save_pretrained(target)  # the same files: a rerun replaces them
    torch.testing.assert_close(LowRankTransform.from_pretrained(target).b, second.b)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"t holds files the new directory would not have \(notes"):
        first.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"
    torch.testing.assert_close(LowRankTransform.from_pretrained(target).b, second.b)
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ValueError, match="f exists and is not a directory"):
        first.save_pretrained(tmp_path / "f")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "t"]  # no temporaries left


class _Payload:
    """Stands for a pickled object a tampered checkpoint could smuggle in."""


def test_checkpoints_load_tensors_and_plain_values_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 3, "w": torch.ones(2), "history": [{"loss": 0.5}]})
    state = load_checkpoint(path)
    assert state["step"] == 3 and state["history"] == [{"loss": 0.5}]
    torch.testing.assert_close(state["w"], torch.ones(2))
    torch.save({"step": 3, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        load_checkpoint(path)
