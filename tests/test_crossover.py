"""bench/crossover.py's reading of its timings, which sets the routing threshold
once a GPU has run it: the kernels must win from an N on, and a backend that
failed (timed as None) wins nothing."""

from bench.crossover import crossovers


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
