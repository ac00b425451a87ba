"""Decode batches from a per-bucket graph: the same numbers as the decode
path, padding that never leaks, bad input that raises and leaves nothing
behind. On CPU (the interpreter) the buffers run without a capture; with
CMIGUARD_TEST_COMPILED=1 on a GPU the same tests replay CUDA graphs."""

import pytest
import torch

from cmiguard import LowRankTransform, purify
from cmiguard.kernels import decode_graph
from cmiguard.kernels.decode import launch_decode
from cmiguard.kernels.decode_graph import bucket_rows, purify_decode_graphed
from cmiguard.kernels.purify import transform_operands
from cmiguard.kernels.reference import purify_reference
from tests.conftest import trained_like
from tests.test_kernels import DEVICE, awkward_logits, close_to_truth, float64_truth, params_of

V = 1000


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(decode_graph, "_GRAPHS", type(decode_graph._GRAPHS)())


def transform_params(rank=5, guard=None):
    transform = trained_like(LowRankTransform(V, rank, guard_margin=guard), scale=0.01)
    return params_of(transform)


def graphed(z, params, logprobs=True, guard=None, tau=1.3):
    out = torch.empty_like(z)
    purify_decode_graphed(z, params, out, tau, logprobs, guard)
    return out


def ungraphed(z, params, logprobs=True, guard=None, tau=1.3):
    out = torch.empty_like(z)
    ops = transform_operands(z, params, check=True, argmax=guard is not None)
    launch_decode(ops, out, tau, logprobs, guard)
    return out


@pytest.mark.parametrize(("logprobs", "guard"), [(True, None), (True, 0.5), (False, 0.5)])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_a_graph_matches_the_decode_path_and_the_twin(n, logprobs, guard):
    p = transform_params()
    z = awkward_logits(n, V)
    ours = graphed(z, p, logprobs, guard)
    # bucket 8 runs 5 rows as 8: the same tiles as 5 rows here, so the same bits
    assert torch.equal(ours, ungraphed(z, p, logprobs, guard))
    if guard is None:
        twin = purify_reference(z, p, 1.3, "logprobs")
        close_to_truth(ours, twin, *float64_truth(z, p, 1.3, "logprobs"), 1e-6)


def test_rows_past_the_batch_never_reach_it():
    p = transform_params()
    seven, five = awkward_logits(7, V, seed=1), awkward_logits(5, V, seed=2)
    first = graphed(seven, p)
    poisoned = seven.clone()
    poisoned[6, 3] = float("nan")  # row 6 stays in the bucket's input after this batch
    with pytest.raises(ValueError, match="contain NaN"):
        graphed(poisoned, p)
    again = [graphed(five, p), graphed(seven, p), graphed(five, p)]
    assert len(decode_graph._GRAPHS) == 1  # both run in bucket 8
    assert torch.equal(again[1], first)
    assert torch.equal(again[0], again[2])
    assert torch.equal(again[0], ungraphed(five, p))


def test_bad_input_raises_and_the_next_batch_is_right():
    p = transform_params(guard=0.5)
    good = awkward_logits(4, V, seed=3)
    want = graphed(good, p, guard=0.5)
    for poison, message in [
        (float("nan"), "contain NaN"),
        (float("inf"), "contain \\+inf"),
        (None, "entirely -inf"),
    ]:
        bad = good.clone()
        if poison is None:
            bad[2] = float("-inf")
        else:
            bad[1, 7] = poison
        with pytest.raises(ValueError, match=message):
            graphed(bad, p, guard=0.5)
        assert torch.equal(graphed(good[:3], p, guard=0.5), want[:3])
        assert torch.equal(graphed(good, p, guard=0.5), want)


def test_an_in_place_update_is_seen_and_a_new_tensor_is_another_graph():
    p = transform_params()
    z = awkward_logits(2, V, seed=4)
    graphed(z, p)
    with torch.no_grad():
        p["b"].mul_(3.0)  # an optimizer step: same storage
    assert torch.equal(graphed(z, p), ungraphed(z, p))
    assert len(decode_graph._GRAPHS) == 1
    moved = {**p, "b": p["b"].clone()}
    assert torch.equal(graphed(z, moved), ungraphed(z, moved))
    assert len(decode_graph._GRAPHS) == 2


def test_rounded_factors_are_served_as_the_same_tensors_until_a_step():
    """bf16 factors rounded afresh per call would be new addresses every decode
    step, so a graph captured per step; purify hands kernels served_params()."""
    t = trained_like(LowRankTransform(V, 5, factor_dtype="bfloat16"), scale=0.01).to(DEVICE)
    z = awkward_logits(2, V, seed=8)
    first = t.served_params()
    assert first["a"].dtype == torch.bfloat16 and t.served_params()["a"] is first["a"]
    graphed(z, t.served_params())
    graphed(z, t.served_params())
    assert len(decode_graph._GRAPHS) == 1
    graphed(z, params_of(t))  # rounded afresh, as purify used to: another capture
    assert len(decode_graph._GRAPHS) == 2
    t.b.grad = torch.ones_like(t.b)
    torch.optim.SGD(t.parameters(), lr=0.5).step()  # in place: a new version
    stepped = t.served_params()
    assert stepped["b"] is not first["b"]
    assert torch.equal(stepped["b"], t.b.detach().bfloat16())
    assert torch.equal(graphed(z, stepped), ungraphed(z, stepped))
    t.load_state_dict({k: v * 2 for k, v in t.state_dict().items()})
    assert torch.equal(t.served_params()["a"], t.a.detach().bfloat16())
    with torch.inference_mode():  # no version counter: made afresh, never stale
        fresh = LowRankTransform(V, 5, factor_dtype="bfloat16")
        assert fresh.served_params()["a"] is not fresh.served_params()["a"]


def test_a_graph_in_use_is_not_handed_to_another_caller(monkeypatch):
    """Another thread may run between a caller's copy in and copy out (the GIL
    switches): a second caller in that window gets a graph of its own, each
    caller its own rows' output, and one graph per bucket stays cached."""
    p = transform_params()
    first, second = awkward_logits(3, V, seed=6), awkward_logits(3, V, seed=7)
    run, used, got = decode_graph.DecodeGraph._run, [], {}

    def run_then_interleave(self):
        run(self)
        used.append(self)
        if len(used) == 1:
            got["second"] = graphed(second, p)

    monkeypatch.setattr(decode_graph.DecodeGraph, "_run", run_then_interleave)
    got["first"] = graphed(first, p)
    assert len(used) == 2 and used[0] is not used[1]
    assert torch.equal(got["first"], ungraphed(first, p))
    assert torch.equal(got["second"], ungraphed(second, p))
    assert list(decode_graph._GRAPHS.values()) == [used[0]]


def test_the_cache_drops_the_least_recently_used(monkeypatch):
    monkeypatch.setattr(decode_graph, "MAX_GRAPHS", 2)
    p = transform_params()
    for n in (1, 2, 1, 4):  # buckets 1, 2, 1 (used again), 4: bucket 2 goes
        graphed(awkward_logits(n, V), p)
    buckets = [key[2] for key in decode_graph._GRAPHS]
    assert buckets == [1, 4]


def test_buckets_are_powers_of_two_up_to_the_graph_limit():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    for n in (0, 17):
        with pytest.raises(ValueError, match="1 to 16 rows"):
            bucket_rows(n)


def test_purify_replays_graphs_only_on_cuda(monkeypatch):
    monkeypatch.setenv("CMIGUARD_BACKEND", "triton")
    transform = trained_like(LowRankTransform(V, 5), scale=0.01).to(DEVICE)
    z = awkward_logits(3, V, seed=5)
    ours = purify(z, transform, output="logprobs")
    assert len(decode_graph._GRAPHS) == (1 if DEVICE == "cuda" else 0)
    purify(awkward_logits(17, V), transform, output="logprobs")  # past the graphs' rows
    assert len(decode_graph._GRAPHS) == (1 if DEVICE == "cuda" else 0)
    monkeypatch.setenv("CMIGUARD_CUDA_GRAPHS", "0")
    assert torch.equal(purify(z, transform, output="logprobs"), ours)
