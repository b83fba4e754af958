"""Knowledge distillation (issue 19 part 1): single model vs 5-member ensemble (+TTA) vs distilled student.

Per dataset, a seeded 20 % of the cases is held out as the **test set**, which nothing trains or selects on. On the
other 80 % (the pool):

- **ensemble**: `medseg cv` with 5 folds -> a 5-member fold-ensemble bundle (temperature-calibrated on OOF pixels),
  predicted with and without TTA (``--teacher-tta``, flips: 4 views -> 20 passes per image);
- **single**: the ensemble's member whose validation fold the student also uses (``fold_<k>/bundle``): one model,
  the same per-model budget, the same training cases as the student;
- **student**: `medseg distill` of the ensemble (+TTA) into the same encoder, same budget, same training cases.

Every model gets the same fixed budget (epochs × patches, stated in the table): Dice then does not depend on how
loaded the shared CPU is. Inference time per image is measured in a separate short step (``--stage time``) with the
load average printed beside it, so it can be rerun on a quiet machine.

    nice -n 15 .venv/bin/python benchmarks/distill.py --stage train    # trains, scores the test cases (~30 min)
    nice -n 15 .venv/bin/python benchmarks/distill.py --stage time     # ms/image of the trained bundles
    .venv/bin/python benchmarks/distill.py --stage table               # the README table from the saved results
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
# name -> (experiment config, shared dataset folder, per-model budget and scale overrides)
DATASETS = {
    "montgomery": ("configs/experiments/lungs_montgomery.yaml", "montgomery_cxr_lung", [
        "data.resample=size", "data.target_size=128", "data.patch_size=[128, 128]", "inference.tile_size=[128, 128]",
        "train.batch_size=8", "train.samples_per_epoch=64"]),
    "isbi2012": ("configs/experiments/isbi2012_membranes.yaml", "isbi2012_em", [
        "data.patch_size=[128, 128]", "train.batch_size=8", "train.samples_per_epoch=64"]),
}
# Epochs per model (each 64 patches, batch 8 -> 8 steps). The first table (4 epochs, 32 steps) left every member far
# from converged; 24 epochs (192 steps) take each dataset ~20 min (5 folds + student, one thread each, side by side) on
# the 2-core CPU, and a 48-epoch single model still gains (Montgomery +0.006, ISBI +0.001): see README.
EPOCHS = 24
COMMON = ["train.accelerator=cpu", "train.warmup_epochs=0.5"]
SMOKE = ["train.epochs=1", "train.samples_per_epoch=16"]  # --smoke: the whole pipeline in minutes, numbers meaningless
RESULTS = REPO / "benchmarks" / "results" / "distill.json"


def split_pool_test(name: str, work: Path, test_share: float = 0.2, seed: int = 0):
    """(pool folder of symlinks, test cases): a seeded share of the dataset's cases held out."""
    from medseg.data import discover_cases

    root = SHARED / DATASETS[name][1]
    cases = discover_cases(root)
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    n_test = max(2, round(test_share * len(cases)))
    test = [cases[i] for i in sorted(order[:n_test])]
    pool = work / name / "pool"
    for sub in ("images", "masks"):
        (pool / sub).mkdir(parents=True, exist_ok=True)
    for i in sorted(order[n_test:]):
        c = cases[i]
        for sub, src in (("images", c.image), ("masks", c.mask)):
            link = pool / sub / src.name
            if not link.exists():
                link.symlink_to(src)
    return pool, test


def test_dice(bundle: Path, cases, tta: str) -> tuple[float, float]:
    """Mean foreground Dice (± sd over cases) of ``bundle`` with ``tta`` on ``cases``, through `evaluate_cases`."""
    from dataclasses import replace

    from medseg.bundle import load_bundle
    from medseg.engine.evaluate import evaluate_cases
    from medseg.inference import Predictor

    b = load_bundle(bundle)
    b = replace(b, config=b.config.model_copy(update={"inference": b.config.inference.model_copy(update={"tta": tta})}))
    result = evaluate_cases(Predictor.from_bundle(b, device="cpu"), cases, b.config, hd95=False)
    per_case = {}
    for r in result.rows:
        if r["label"] != b.config.data.labels[0]:
            per_case.setdefault(r["case"], []).append(r["dice"])
    values = np.array([np.mean(v) for v in per_case.values()])
    return float(values.mean()), float(values.std())


def train_stage(name: str, work: Path, teacher_tta: str, epochs: int, smoke: bool = False,
                teacher_encoder: str | None = None) -> dict:
    """``teacher_encoder``: the ensemble uses that encoder (e.g. Lite2) and the student the config's (Lite0); the
    single-model row is then the config's encoder's fold member, so the row set reads "small model, big ensemble,
    small student"."""
    from medseg.config import load_config
    from medseg.engine.cv import cross_validate
    from medseg.engine.distill import distill

    config, _, budget = DATASETS[name]
    pool, test = split_pool_test(name, work)
    budget = [*budget, f"train.epochs={epochs}"]
    sets = [f"data.root={pool}", *budget, *COMMON, *(SMOKE if smoke else [])]
    tag = "" if teacher_encoder is None else "_" + teacher_encoder.rsplit("_", 1)[-1]  # "_lite2"
    teacher_sets = [*sets, f"name={name}-ensemble{tag}"] + ([f"model.encoder={teacher_encoder}"] if teacher_encoder else [])
    cfg = load_config(REPO / config, teacher_sets)
    t0 = time.time()
    cv = cross_validate(cfg, work / name / f"cv{tag}", folds=5, resume=True, progress=False, device="cpu")
    cv_minutes = (time.time() - t0) / 60
    from medseg.bundle import load_bundle

    teacher = load_bundle(cv.bundle)
    fold = teacher.config.data.fold
    if teacher_encoder is not None:  # the single model the student competes with: the config's encoder
        cross_validate(load_config(REPO / config, [*sets, f"name={name}-ensemble"]), work / name / "cv", folds=5,
                       resume=True, progress=False, device="cpu")
    single = work / name / "cv" / f"fold_{fold}" / "bundle"
    t0 = time.time()
    student_encoder = load_config(REPO / config).model.encoder if teacher_encoder else None
    student = distill(cv.bundle, pool, work / name / f"student{tag}", max_minutes=None, teacher_tta=teacher_tta,
                      student_encoder=student_encoder, device="cpu", progress=False)
    student_minutes = (time.time() - t0) / 60
    small, big = (load_bundle(single).config.model.encoder, teacher.config.model.encoder)
    short = {e: e.rsplit("_", 1)[-1] for e in (small, big)}
    suffix = f" ({short[big]})" if teacher_encoder else ""
    rows = {
        f"single ({short[small]})" if teacher_encoder else "single": (single, "none", 1),
        f"ensemble{suffix}": (cv.bundle, "none", 5),
        f"ensemble+{teacher_tta}{suffix}": (cv.bundle, teacher_tta, student.teacher_passes),
        f"student ({short[small]} of {short[big]})" if teacher_encoder else "student": (student.bundle, "none", 1),
    }
    out = {"dataset": name, "key": name + tag.replace("_", "+"), "test_cases": len(test),
           "pool_cases": len(list((pool / "images").iterdir())), "teacher_encoder": big, "student_encoder": small,
           "budget": budget, "teacher_tta": teacher_tta, "cv_minutes": round(cv_minutes, 1),
           "student_minutes": round(student_minutes, 1), "student_val_dice": student.student_dice,
           "teacher_val_dice": student.teacher_dice, "models": {}}
    for label, (bundle, tta, passes) in rows.items():
        mean, sd = test_dice(bundle, test, tta)
        out["models"][label] = {"bundle": str(bundle), "tta": tta, "passes": passes, "dice": mean, "dice_sd": sd}
        print(f"{name:11s} {label:16s} passes {passes:3d}  test Dice {mean:.4f} ± {sd:.4f}", flush=True)
    _, kept = gain_and_kept(out)
    out["kept_share_of_gain"] = kept[0][1] if kept else None
    return out


def gain_and_kept(result: dict) -> tuple[float, list[tuple[str, float]]]:
    """(ensemble+TTA Dice − single Dice, [(student row, share of that gain it keeps)]); no shares without a gain."""
    m = result["models"]
    single = next(row for label, row in m.items() if label.startswith("single"))
    ensemble_tta = next(row for label, row in m.items() if label.startswith(f"ensemble+{result['teacher_tta']}"))
    gain = ensemble_tta["dice"] - single["dice"]
    kept = [(label, (row["dice"] - single["dice"]) / gain) for label, row in m.items() if label.startswith("student")]
    return gain, kept if gain > 0 else []


def _ensemble_row(result: dict) -> dict:
    return next(row for label, row in result["models"].items() if label.startswith("ensemble") and "+" not in label)


def train_single(result: dict, sets: list[str], out_name: str) -> Path:
    """Another single model like the ensemble's fold member (same fold, split file, budget) with config ``sets``
    (e.g. another ``train.seed`` or ``train.epochs``); returns its bundle."""
    from medseg.bundle import load_bundle
    from medseg.config import load_config
    from medseg.engine.cv import fold_config
    from medseg.engine.train import train

    name, work = result["dataset"], Path(result["work"])
    pool, _ = split_pool_test(name, work)
    config, _, budget = DATASETS[name]
    ensemble = _ensemble_row(result)
    cv = Path(ensemble["bundle"]).parent
    teacher = load_bundle(ensemble["bundle"]).config
    cfg = load_config(REPO / config, [f"data.root={pool}", *budget, f"train.epochs={teacher.train.epochs}", *COMMON,
                                        *sets, f"name={name}-{out_name}"])
    return train(fold_config(cfg, 5, teacher.data.fold, cv / "splits.json"), work / name / out_name,
                 progress=False).bundle


def train_student(result: dict, sets: list[str], out_name: str, teacher_tta: str):
    """Another student of the saved ensemble (same training cases and budget) with config ``sets``. The teacher's
    targets are read from the first student's cache (same teacher, TTA and grid: the key matches)."""
    import shutil

    from medseg.engine.distill import distill

    name, work = result["dataset"], Path(result["work"])
    pool, _ = split_pool_test(name, work)
    out = work / name / out_name
    first_student = next(row for label, row in result["models"].items() if label.startswith("student"))
    first = Path(first_student["bundle"]).parent / "teacher_targets"
    if first.is_dir() and not (out / "teacher_targets").exists():
        shutil.copytree(first, out / "teacher_targets")
    return distill(_ensemble_row(result)["bundle"], pool, out, max_minutes=None, teacher_tta=teacher_tta,
                   device="cpu", progress=False, overrides=sets)


def _tag(kind: str, sets: list[str]) -> str:
    return f"{kind} " + " ".join(x.removeprefix("distill.") for x in sets)


def student_stage(result: dict, sets: list[str], teacher_tta: str) -> None:
    """One more student with ``sets`` (e.g. another ``distill.weight``/``distill.temperature``, or
    ``train.epochs``): trained, scored on the same test cases, added as a model row."""
    tag = _tag("student", sets)
    student = train_student(result, sets, tag.replace(" ", "_").replace("=", ""), teacher_tta)
    _, test = split_pool_test(result["dataset"], Path(result["work"]))
    mean, sd = test_dice(student.bundle, test, "none")
    result["models"][tag] = {"bundle": str(student.bundle), "tta": "none", "passes": 1, "dice": mean, "dice_sd": sd,
                             "targets_computed": student.targets_computed}
    print(f"{result['dataset']:11s} {tag:16s} passes   1  test Dice {mean:.4f} ± {sd:.4f}", flush=True)


def single_stage(result: dict, sets: list[str]) -> None:
    """One more single model with ``sets`` (e.g. ``train.epochs=48``: what the student's extra training would give
    the single model), added as a model row."""
    tag = _tag("single", sets)
    bundle = train_single(result, sets, tag.replace(" ", "_").replace("=", ""))
    _, test = split_pool_test(result["dataset"], Path(result["work"]))
    mean, sd = test_dice(bundle, test, "none")
    result["models"][tag] = {"bundle": str(bundle), "tta": "none", "passes": 1, "dice": mean, "dice_sd": sd}
    print(f"{result['dataset']:11s} {tag:16s} passes   1  test Dice {mean:.4f} ± {sd:.4f}", flush=True)


def seeds_stage(result: dict, seeds: list[int], teacher_tta: str) -> None:
    """Run-to-run spread: the single model (the same fold, split and budget) and the student retrained with other
    ``train.seed`` values, each scored on the same test cases; ``result["seeds"]`` gets a row per seed. Another seed
    changes the initial decoder weights, the patch draws and the augmentation; the split and the teacher stay."""
    _, test = split_pool_test(result["dataset"], Path(result["work"]))
    models = result["models"]
    rows = result.setdefault("seeds", {})
    rows.setdefault("42", {"single": next(row["dice"] for label, row in models.items() if label.startswith("single")),
                           "student": models["student"]["dice"]})
    for seed in seeds:
        if str(seed) in rows:
            continue
        single = train_single(result, [f"train.seed={seed}"], f"single_seed{seed}")
        student = train_student(result, [f"train.seed={seed}"], f"student_seed{seed}", teacher_tta)
        rows[str(seed)] = {"single": test_dice(single, test, "none")[0],
                           "student": test_dice(student.bundle, test, "none")[0]}
        print(f"{result['dataset']:11s} seed {seed}: single {rows[str(seed)]['single']:.4f}, "
              f"student {rows[str(seed)]['student']:.4f}", flush=True)


def time_stage(result: dict, n_images: int) -> None:
    """ms per image (median over ``n_images`` test images, after one warm-up) for every model row, end to end
    (`predict_scan`: preprocessing, passes, resampling back, post-processing); the 1-min load average beside it."""
    from dataclasses import replace

    from medseg.bundle import load_bundle
    from medseg.inference import Predictor
    from medseg.io import read_scan

    _, test = split_pool_test(result["dataset"], Path(result["work"]))
    scans = [read_scan(c.image) for c in test[:n_images]]
    for label, row in result["models"].items():
        b = load_bundle(row["bundle"])
        b = replace(b, config=b.config.model_copy(
            update={"inference": b.config.inference.model_copy(update={"tta": row["tta"], "backend": "torch"})}))
        predictor = Predictor.from_bundle(b, device="cpu")
        predictor.predict_scan(scans[0])  # warm-up
        load = os.getloadavg()[0]
        times = []
        for scan in scans:
            t0 = time.perf_counter()
            predictor.predict_scan(scan)
            times.append(time.perf_counter() - t0)
        row["ms_per_image"] = 1000 * float(np.median(times))
        row["load_during_timing"] = round((load + os.getloadavg()[0]) / 2, 2)
        print(f"{result['dataset']:11s} {label:16s} {row['ms_per_image']:8.0f} ms/image (load {row['load_during_timing']})",
              flush=True)


def table(results: list[dict]) -> str:
    lines = ["| dataset (test cases) | model | passes/image | test Dice (mean ± sd) | ms/image (load) |",
             "|---|---|---|---|---|"]
    for r in results:
        for label, m in r["models"].items():
            ms = f"{m['ms_per_image']:.0f} ({m['load_during_timing']})" if "ms_per_image" in m else "not timed"
            lines.append(f"| {r['dataset']} ({r['test_cases']}) | {label} | {m['passes']} | "
                         f"{m['dice']:.4f} ± {m['dice_sd']:.4f} | {ms} |")
    lines.append("")
    for r in results:
        gain, kept = gain_and_kept(r)
        kept_text = ", ".join(f"{label} {100 * share:+.0f} %" for label, share in kept) or \
            "n/a (the ensemble did not beat the single model)"
        lines.append(f"- {r.get('key', r['dataset'])}: share of the ensemble+TTA's Dice gain over the single model ({gain:+.4f}) "
                     f"that the student keeps: {kept_text}; "
                     f"budget per model `{' '.join(b for b in r['budget'] if b.startswith('train.'))}`; "
                     f"5-fold ensemble {r['cv_minutes']} min, student {r['student_minutes']} min (teacher targets "
                     "included) of wall time on the shared CPU")
        if len(r.get("seeds", {})) > 1:
            seeds = r["seeds"]
            single, student = (np.array([row[k] for row in seeds.values()]) for k in ("single", "student"))
            lines.append(f"  - {r.get('key', r['dataset'])} over seeds {', '.join(seeds)}: single "
                         f"{single.mean():.4f} ± {single.std(ddof=1):.4f}, student {student.mean():.4f} ± "
                         f"{student.std(ddof=1):.4f} (mean ± sd of the per-seed test Dice); student − single per seed: "
                         + ", ".join(f"{b - a:+.4f}" for a, b in zip(single, student, strict=True)))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("train", "student", "single", "seeds", "time", "table"), default="train")
    parser.add_argument("--single-set", nargs="+", default=["train.epochs=48"],
                        help="--stage single: config overrides of the extra single model")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="--stage seeds: train.seed values")
    parser.add_argument("--student-set", nargs="+", default=["distill.weight=0.5", "distill.temperature=1.0"],
                        help="--stage student: config overrides of the extra student")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench_distill")
    parser.add_argument("--teacher-tta", default="flips")
    parser.add_argument("--time-images", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="--stage train: epochs of 64 patches per model")
    parser.add_argument("--teacher-encoder", default=None,
                        help="--stage train: the ensemble's encoder (e.g. timm-tf_efficientnet_lite2); the student and the "
                             "single model keep the config's (Lite0). Its rows are saved beside the same-encoder rows")
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 16 patches per model (pipeline check)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("medseg.distill").setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    results = Path("/tmp/medseg_distill_smoke.json") if args.smoke else RESULTS  # smoke numbers are no result

    def read() -> dict[str, dict]:
        return {r.get("key", r["dataset"]): r for r in json.loads(results.read_text())} if results.is_file() else {}

    saved = read()
    tag = "" if args.teacher_encoder is None else "+" + args.teacher_encoder.rsplit("_", 1)[-1]
    for name in args.datasets:
        key = name + tag
        if args.stage == "train":
            saved[key] = {**train_stage(name, args.work, args.teacher_tta, args.epochs, args.smoke,
                                        args.teacher_encoder), "work": str(args.work)}
        elif args.stage == "student":
            student_stage(saved[key], args.student_set, args.teacher_tta)
        elif args.stage == "seeds":
            seeds_stage(saved[key], args.seeds, args.teacher_tta)
        elif args.stage == "single":
            single_stage(saved[key], args.single_set)
        elif args.stage == "time":
            time_stage(saved[key], args.time_images)
        # Re-read before writing: the datasets may run as parallel processes sharing the file.
        saved = {**read(), key: saved[key]}
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(list(saved.values()), indent=1))
    print(table(sorted(saved.values(), key=lambda r: (list(DATASETS).index(r["dataset"]), r.get("key", "")))))

if __name__ == "__main__":
    main()
