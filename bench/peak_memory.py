"""Peak resident memory of one call, above its inputs, in this fresh process (Linux).

    python -m bench.peak_memory purify 1024 49152 64 ours   ->  bytes

Resets the kernel's high-water mark (``/proc/self/clear_refs``) after the
inputs exist, runs the call once and reads ``VmHWM``: what the call itself
needed, output included.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.problems import Case, implementations, make_inputs  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("op", choices=["purify", "train"])
    parser.add_argument("n", type=int, help="rows")
    parser.add_argument("v", type=int, help="vocabulary")
    parser.add_argument("rank", type=int, help="the transform's rank")
    parser.add_argument("impl", choices=["ours", "eager", "compile"])
    args = parser.parse_args()
    case = Case(args.op, args.n, args.v, args.rank)
    z, labels, t = make_inputs(case, "cpu")
    fn = implementations(case, z, labels, t)[args.impl]
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    print((peak - before) * 1024)


if __name__ == "__main__":
    main()
