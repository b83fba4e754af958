"""Each SGDR snapshot of a `benchmarks/recipes.py` run scored alone, and the last-k snapshot ensembles, on the
same held-out test cases: does the snapshot ensemble lose because its early members are weak?

    .venv/bin/python benchmarks/analysis/sgdr_snapshots.py [--out outputs/bench]   # after recipes.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from recipes import DATASETS, split_dev_test  # noqa: E402

from medseg.config import load_config  # noqa: E402
from medseg.data.preprocess import map_labels  # noqa: E402
from medseg.inference import Predictor  # noqa: E402
from medseg.io import read_scan  # noqa: E402
from medseg.metrics import mean_foreground_dice, per_label_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "outputs/bench", help="parent of recipes_<dataset>/")
    ap.add_argument("--cases", type=int, default=120, help="as given to recipes.py")
    args = ap.parse_args()
    print("| dataset | members | test Dice |\n|---|---|---|")
    for name, (config, folder) in DATASETS.items():
        bundle = args.out / f"recipes_{name}" / name / "sgdr" / "bundle"
        if not bundle.exists():
            continue
        base = load_config(REPO / config, [f"data.root={REPO.parent / 'shared/datasets' / folder}"])
        _, test = split_dev_test(base, args.cases, 0.2)
        full = Predictor.from_bundle(bundle, device="cpu")
        data = []
        for case in test:
            scan = read_scan(case.image)
            data.append((scan, map_labels(read_scan(case.mask), base.data.label_map, scan.spatial_shape, case.mask.name)))
        n = len(full.members)
        groups = {f"snapshot {i + 1} alone": [i] for i in range(n)}
        groups.update({f"last {k} ensembled": list(range(n - k, n)) for k in range(2, n + 1)})
        for label, members in groups.items():
            p = Predictor([full.members[i] for i in members], full.cfg, full.labels, full.temperature, "cpu")
            dice = [mean_foreground_dice(per_label_metrics(p.predict_scan(s).mask, t, base.data.num_classes, hd95=False))
                    for s, t in data]
            print(f"| {name} | {label} | {np.mean(dice):.4f} |", flush=True)


if __name__ == "__main__":
    main()
