"""Speed of compute_weight_map (U-Net boundary weight maps) on synthetic and real instance maps.

    .venv/bin/python benchmarks/weightmap.py [--repeats 5] [--reference]

Synthetic maps: random discs (radius 6-14 px, ~22% foreground, many touching), 200 per 512² and
proportionally more/fewer for other sizes, so time should grow about linearly with pixels. Real maps: the
most crowded DSB2018 instance maps. ``--reference`` also times the full-EDT-per-object reference and shows
the largest difference to it (needs seconds to minutes). Prints a table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from medseg.transforms.weightmap import compute_weight_map, compute_weight_map_reference

DATASETS = Path(
    os.environ.get("MEDSEG_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)
DSB_CASES = ("042_0ea221716cf1", "417_a102535b0e88", "209_4e07a653352b")  # 369, 375, 136 nuclei


def random_discs(size: int, count: int, seed: int = 0) -> np.ndarray:
    """``(size, size)`` int32 map of exactly ``count`` random discs; overlaps stay with the earlier disc."""
    rng = np.random.default_rng(seed)
    objects = np.zeros((size, size), dtype=np.int32)
    k = 0
    while k < count:
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(6, 14)
        y0, y1 = int(max(cy - r, 0)), int(min(cy + r + 1, size))
        x0, x1 = int(max(cx - r, 0)), int(min(cx + r + 1, size))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        sub = objects[y0:y1, x0:x1]
        new = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (sub == 0)
        if new.any():  # a disc hidden under earlier ones is not an object
            k += 1
            sub[new] = k
    return objects


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: imports, caches
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="also time the slow reference")
    args = parser.parse_args()

    cases: list[tuple[str, np.ndarray]] = []
    for size in (256, 512, 1024, 2048):
        count = round(200 * (size / 512) ** 2)
        cases.append((f"synthetic {size}² discs", random_discs(size, count)))
    for stem in DSB_CASES:
        path = DATASETS / "dsb2018_nuclei" / "instances" / f"{stem}.png"
        cases.append((f"DSB2018 {stem}", np.asarray(Image.open(path)).astype(np.int32)))

    table = Table(title=f"compute_weight_map (w0=10, σ=5 px), best of {args.repeats}, {os.cpu_count()} CPUs")
    for col in ("case", "shape", "objects", "time ms", "ns / px"):
        table.add_column(col, justify="left" if col == "case" else "right")
    if args.reference:
        table.add_column("reference ms", justify="right")
        table.add_column("max |fast - ref|", justify="right")

    for name, objects in cases:
        t = best_time(lambda o=objects: compute_weight_map(o), args.repeats)
        row = [
            name,
            "×".join(map(str, objects.shape)),
            str(len(np.unique(objects)) - 1),
            f"{t * 1e3:.1f}",
            f"{t * 1e9 / objects.size:.0f}",
        ]
        if args.reference:
            if objects.size <= 512 * 512:
                t0 = time.perf_counter()
                ref = compute_weight_map_reference(objects)
                t_ref = time.perf_counter() - t0
                err = np.abs(compute_weight_map(objects) - ref).max()
                row += [f"{t_ref * 1e3:.0f}", f"{err:.1e}"]
            else:
                row += ["-", "-"]
        table.add_row(*row)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
