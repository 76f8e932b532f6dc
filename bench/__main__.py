"""`python -m bench`: run every benchmark in turn; exit 1 if any missed its target."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = (
    "bench.enqueue",
    "bench.saturation",
    "bench.rate",
    "bench.overhead",
    "bench.memory",
    "bench.paid_once",
    "bench.image_memory",
    "bench.skip",
    "bench.api",
    "bench.autoscale",
    "bench.account",
)


def main() -> int:
    failed = 0
    for name in BENCHMARKS:
        module = importlib.import_module(name)
        failed += module.main([]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
