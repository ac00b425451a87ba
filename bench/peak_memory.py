"""Peak resident memory of one call, above its inputs, in this fresh process (Linux).

    python -m bench.peak_memory purify 1024 49152 64 ours   ->  bytes

Resets the kernel's high-water mark (``/proc/self/clear_refs``) after the
inputs exist, runs the call once and reads ``VmHWM``: what the call itself
needed, output included.
"""

from __future__ import annotations

import sys

from bench.problems import Case, implementations, make_inputs


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    op, n, v, rank, impl = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    case = Case(op, n, v, rank)
    z, labels, t = make_inputs(case, "cpu")
    fn = implementations(case, z, labels, t)[impl]
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    print((peak - before) * 1024)


if __name__ == "__main__":
    main()
