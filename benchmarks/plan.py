"""The default plan against today's fixed recipe at the same wall-clock budget (issue: auto-plan).

For DSB2018, Montgomery and ISBI 2012, and for scale-jittered copies of DSB2018 and Montgomery (every image and its
mask resized by its own random factor, log-uniform in 0.5x-3x, made here in a temporary folder), train

  (a) ``fixed``: benchmarks/configs/fixed_base.yaml (configs/base.yaml as it was before the planner: 256² patches,
      512² tiles, 50 epochs, native grid), stopped by Lightning's ``max_time`` at the budget (as ``--max-minutes``
      did before the planner: the schedule never sees the budget);
  (b) ``plan``: no config at all — ``medseg train --data DIR --max-minutes B``: everything planned, the budget
      covering fingerprint, caching, training, validation and the final evaluation;

and score both bundles the same way: every case of fold 0's validation split, predicted on its own grid
(`medseg.engine.evaluate.evaluate_cases`). Each run is a child process: its peak RSS is the child's own
(``wait4``). Raw rows are appended to ``benchmarks/results/plan.jsonl`` and reused, so the table can be filled over
several sessions (``--force`` re-runs). Run it alone: timings and therefore what fits the budget depend on it.

    .venv/bin/python benchmarks/plan.py                       # every row, 8 min each (~90 min)
    .venv/bin/python benchmarks/plan.py --rows dsb2018 --minutes 1 --limit-cases 40 --results /tmp/smoke.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("MEDSEG_DATASETS", REPO.parent / "shared" / "datasets"))
ROWS = {
    "dsb2018": ("dsb2018_nuclei", False),
    "montgomery": ("montgomery_cxr_lung", False),
    "isbi2012": ("isbi2012_em", False),
    "dsb2018-jittered": ("dsb2018_nuclei", True),
    "montgomery-jittered": ("montgomery_cxr_lung", True),
}
RECIPES = ("fixed", "plan")
JITTER = (0.5, 3.0)


def jittered_copy(src: Path, dst: Path, seed: int = 0, limit: int | None = None) -> Path:
    """``src``'s images and masks, each pair resized by one random factor (log-uniform in JITTER): bilinear for
    the image, nearest for the mask. Same stems, so the same fold split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    images = sorted((src / "images").iterdir())[:limit]
    for image_path in images:
        mask_path = next((src / "masks").glob(image_path.stem + ".*"))
        factor = float(np.exp(rng.uniform(np.log(JITTER[0]), np.log(JITTER[1]))))
        with Image.open(image_path) as im, Image.open(mask_path) as mk:
            size = (max(16, round(im.width * factor)), max(16, round(im.height * factor)))
            im.resize(size, Image.BILINEAR).save(dst / "images" / image_path.name)
            mk.resize(size, Image.NEAREST).save(dst / "masks" / mask_path.name)
    return dst


def limited_copy(src: Path, dst: Path, limit: int) -> Path:
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for p in sorted((src / sub).iterdir())[:limit]:
            shutil.copy(p, dst / sub / p.name)
    return dst


def run_child(recipe: str, data: Path, out: Path, minutes: float) -> dict:
    """One training run in this script's child mode; returns its record plus peak RSS and wall time."""
    cmd = [sys.executable, __file__, "--child", recipe, "--data", str(data), "--out", str(out), "--minutes", str(minutes)]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    result_line = next((ln for ln in reversed(lines) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or result_line is None:
        tail = "".join(lines[-20:])
        raise RuntimeError(f"{recipe} on {data.name} failed ({proc.returncode}):\n{tail}")
    record = json.loads(result_line[len("RESULT "):])
    record.update(peak_rss_gb=round(usage.ru_maxrss / 2**20, 2), wall_minutes=round(wall / 60, 2))
    return record


def child(recipe: str, data: Path, out: Path, minutes: float) -> None:
    """Train one recipe on ``data`` within ``minutes`` and print ``RESULT {json}``."""
    from datetime import timedelta

    import torch

    from medseg.config import load_config
    from medseg.engine.train import train

    sets = [f"data.root={data}"]
    if recipe == "fixed":
        cfg = load_config(REPO / "benchmarks/configs/fixed_base.yaml", sets)
        result = train(cfg, out, progress=False, max_time=timedelta(minutes=minutes))
    else:
        cfg = load_config(None, [*sets, f"train.budget_minutes={minutes}"])
        result = train(cfg, out, progress=False)
    # train() ends by scoring the shipped bundle on every validation case on their own grids (evaluate_cases):
    # the same measurement for both recipes.
    info = json.loads((out / "run_info.json").read_text())
    plan = (out / "plan.yaml").read_text() if (out / "plan.yaml").is_file() else ""
    record = {
        "recipe": recipe, "val_dice": round(result.val_dice, 4), "val_cases": info["result"]["val_cases"],
        "best_checkpoint_dice": round(result.best_val_dice, 4), "epochs": result.epochs_run, "steps": result.global_step,
        "train_minutes": round(result.seconds / 60, 2),
        "threads": torch.get_num_threads(), "budget": info.get("budget", {}).get("replans", [])[-1:] or None,
        "plan": [ln.strip() for ln in plan.splitlines() if ln.startswith("  ")],
    }
    print("RESULT " + json.dumps(record), flush=True)


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def print_table(rows: list[dict], minutes: float) -> None:
    print("\n| dataset | recipe | val Dice | val cases | epochs / steps | wall min | peak RSS GB | machine |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("minutes") != minutes:
            continue
        print(f"| {r['dataset']} | {r['recipe']} | {r['val_dice']:.4f} | {r['val_cases']} | {r['epochs']} / {r['steps']} | "
              f"{r['wall_minutes']:.1f} | {r['peak_rss_gb']:.2f} | {r['machine']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--limit-cases", type=int, default=None, help="smoke tests: the first N cases only")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results/plan.jsonl")
    ap.add_argument("--work", type=Path, default=None, help="where runs and jittered copies go (default: a temp dir)")
    ap.add_argument("--force", action="store_true", help="re-run rows already in the results file")
    ap.add_argument("--child", choices=RECIPES, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.out, args.minutes)
        return

    machine = f"{platform.machine()} {os.cpu_count()} cores"
    done = load_rows(args.results)
    work = args.work or Path(tempfile.mkdtemp(prefix="medseg-plan-bench-"))
    try:
        for row in args.rows:
            name, jitter = ROWS[row]
            src = DATASETS / name
            data = src
            for recipe in args.recipes:
                key = (row, recipe, args.minutes, args.limit_cases)
                if not args.force and any((r["dataset"], r["recipe"], r["minutes"], r.get("limit_cases")) == key for r in done):
                    print(f"{row} / {recipe}: already in {args.results.name}", flush=True)
                    continue
                if data is src and (jitter or args.limit_cases):
                    data = (jittered_copy(src, work / f"{row}-data", limit=args.limit_cases) if jitter
                            else limited_copy(src, work / f"{row}-data", args.limit_cases))
                print(f"{row} / {recipe}: training for {args.minutes:g} min ...", flush=True)
                record = run_child(recipe, data, work / f"{row}-{recipe}", args.minutes)
                record.update(dataset=row, minutes=args.minutes, limit_cases=args.limit_cases, machine=machine,
                              date=time.strftime("%Y-%m-%d"))
                print(f"  val Dice {record['val_dice']:.4f} on {record['val_cases']} cases, {record['wall_minutes']:.1f} min, "
                      f"peak RSS {record['peak_rss_gb']:.2f} GB", flush=True)
                args.results.parent.mkdir(parents=True, exist_ok=True)
                with args.results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                done.append(record)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(done, args.minutes)


if __name__ == "__main__":
    main()
