"""Repeat a manifest's rows until it has N rows, with unique ids: a bigger batch to measure.

    python examples/repeat_manifest.py examples/manifest.csv 1000 examples/manifest-1000.csv

Relative image paths keep working when OUT sits in the same folder as the source manifest.
"""

from __future__ import annotations

import csv
import itertools
import sys
from pathlib import Path


def repeat_manifest(source: Path, rows: int, out: Path) -> None:
    with source.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        template = list(reader)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for n, row in zip(range(rows), itertools.cycle(template), strict=False):
            writer.writerow({**row, "id": f"{row['id']}-{n:06d}"})


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(f"usage: {Path(argv[0]).name} MANIFEST ROWS OUT", file=sys.stderr)
        return 2
    repeat_manifest(Path(argv[1]), int(argv[2]), Path(argv[3]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
