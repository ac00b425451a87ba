"""bench/crossover.py's reading of its timings, which sets the routing threshold
once a GPU has run it: the kernels must win from an N on, and a backend that
failed (timed as None, as the GPU sweeps time a failure) wins nothing."""

from bench.crossover import crossovers
from bench.report import time_or_none


def test_a_failed_timing_is_none_and_says_why(capsys):
    def fails(fn):
        raise RuntimeError("out of resource: shared memory, Required: 296960")

    assert time_or_none(lambda fn: 0.25, None, "purify N=1") == 0.25
    assert capsys.readouterr().out == ""
    assert time_or_none(fails, None, "train N=1 64x128 w8") is None
    assert capsys.readouterr().out == (
        "train N=1 64x128 w8: RuntimeError: out of resource: shared memory, Required: 296960\n"
    )


def test_the_crossover_is_where_the_kernels_win_for_good():
    def rows(op, kernels):
        return [
            {"op": op, "v": 10, "n": n, "kernels_s": k, "twin_s": 1.0}
            for n, k in zip((1, 2, 4, 8, 16), kernels, strict=False)
        ]

    timed = rows("purify", (2.0, 0.5, 1.5, 0.5, 0.4))  # a win at 2, lost again at 4
    timed += rows("train", (None, 0.5))  # the kernels failed at N = 1
    timed += rows("logits", (0.5, None))  # and at the largest N: no win for good
    assert crossovers(timed) == [
        {"op": "purify", "v": 10, "n": 8, "logits": 80},
        {"op": "train", "v": 10, "n": 2, "logits": 20},
        {"op": "logits", "v": 10, "n": None, "logits": None},
    ]
