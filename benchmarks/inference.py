"""Inference benchmark: latency/throughput per 512×512 slice by TTA mode and batch, hardware efficiency,
TTA cost vs passes, peak RAM of a 512×512×300 volume, and the Dice gain of TTA and ensembling.

    .venv/bin/python benchmarks/inference.py                      # outputs/demo/bundle (make demo)
    .venv/bin/python benchmarks/inference.py --bundle B1 --bundle B2 --threads 2

Prints tables; asserts nothing. Targets (printed, not enforced): efficiency >= 40% of the machine's matmul
FLOP/s without TTA; TTA time proportional to the passes' work; volume peak RAM < 3 GB.

Efficiency = model FLOPs actually executed (``torch.utils.flop_counter.FlopCounterMode`` over the whole call,
so overlapping tiles and mirror margins count) / wall time, divided by the FLOP/s of a large ``torch.matmul``
measured in the same run. Peak RAM is the child process's peak RSS (VmHWM in /proc/self/status). The volume run
uses a 1×1-convolution stand-in network by default (the pipeline's own memory: input, preprocessing, outputs,
batches), plus a real-network run on 16 slices for the network's activation memory (its peak over its RSS
before predicting, minus the stand-in's); ``--volume-model real``
runs the real network on all slices (slow on a CPU). Ensembling needs two members: if the bundles give only
one, a second is trained once with another seed (``--second-member-epochs``) and cached under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg.inference import Predictor  # noqa: E402
from medseg.io import Geometry, Scan  # noqa: E402

TARGET_EFFICIENCY = 0.40
TARGET_RAM_GB = 3.0


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul (the machine's practical peak for dense math)."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.matmul(a, b)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def timed_predict(predictor: Predictor, image: torch.Tensor, repeats: int, tta: str) -> tuple[float, float]:
    """(seconds per call, model FLOPs per call) of ``predictor.predict_image(image, tta=tta)``.

    The FLOPs are counted in one separate eager call: a FlopCounterMode around the timed calls would make a
    compiled predictor fall back to slow eager dispatch (and cannot see inside compiled kernels anyway)."""
    counting = Predictor(predictor.members, predictor.cfg, predictor.labels, predictor.temperature, predictor.device,
                         backend="torch")
    with FlopCounterMode(display=False) as counter:
        counting.predict_image(image, tta=tta)
    t = time.perf_counter()
    for _ in range(repeats):
        predictor.predict_image(image, tta=tta)
    return (time.perf_counter() - t) / repeats, float(counter.get_total_flops())


def useful_flops(predictor: Predictor, size: int = 512) -> float:
    """FLOPs of one untiled pass over a size×size slice: the work a prediction needs, without tile overlap."""
    x = torch.rand(1, predictor.cfg.data.input_channels, size, size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        predictor.members[0](x)
    return float(counter.get_total_flops()) * len(predictor.members)


def speed_tables(
    predictor: Predictor, modes: list[str], batches: list[int], repeats: int, peak: float, whole_tile: int
) -> None:
    rng = np.random.default_rng(0)
    useful = useful_flops(predictor)
    tile = tuple(predictor.inference.tile_size)
    rows = []
    # Warm-up: oneDNN creates its convolution primitives on first use of each shape (seconds on this CPU).
    predictor.predict_image(torch.rand(predictor.cfg.data.input_channels, 512, 512))
    settings = [(mode, batch, tile) for batch in batches for mode in modes]
    if whole_tile and whole_tile != tile[0]:
        settings.append(("none", batches[0], (whole_tile, whole_tile)))
    for mode, batch, tile_size in settings:
        predictor.inference.tile_size = tile_size
        if batch > 1:  # slices per model call; a single image keeps the bundle's batch of tiles
            predictor.inference.batch_size = batch
        if batch == 1:  # one 2D image, (input channels, H, W)
            image = torch.from_numpy(rng.random((predictor.cfg.data.input_channels, 512, 512), dtype=np.float32))
        else:  # a batch of slices: the 2.5D volume path, batch_size slices per model call
            image = torch.from_numpy(rng.random((predictor.cfg.data.channels, batch, 512, 512), dtype=np.float32))
        if predictor.backend != "torch":  # compile / export for this setting's shapes outside the timed calls
            predictor.predict_image(image, tta=mode)
        seconds, flops = timed_predict(predictor, image, repeats, mode)
        rows.append((mode, batch, predictor.passes((512, 512), mode), seconds / batch, batch / seconds,
                     flops / batch / 1e9, flops / seconds / 1e9, flops / seconds / peak,
                     useful * batch / seconds / peak, tile_size))
        print(f"  measured tta={mode} batch={batch} tile={tile_size}: {seconds:.2f} s per call", flush=True)
    predictor.inference.tile_size = tile
    print(f"\n## Latency and throughput, 512×512 slices (overlap {predictor.inference.overlap}; "
          f"an untiled pass is {useful / 1e9:.1f} GFLOP)\n")
    print("| TTA | batch | tile | passes | ms / slice | slices / s | GFLOP / slice executed | GFLOP/s | efficiency "
          "| useful efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, batch, passes, lat, thr, gf, gfs, eff, ueff, ts in rows:
        print(f"| {mode} | {batch} | {ts[0]}×{ts[1]} | {passes} | {lat * 1000:.0f} | {thr:.2f} | {gf:.1f} | {gfs:.1f} "
              f"| {eff:.0%} | {ueff:.0%} |")
    print("\nefficiency: executed model FLOP/s ÷ matmul FLOP/s; useful efficiency counts only one untiled pass "
          "per member (tile overlap and mirror margins, and TTA's extra passes, are overhead).")
    best_none = max((r[7] for r in rows if r[0] == "none"), default=0.0)
    verdict = "met" if best_none >= TARGET_EFFICIENCY else "NOT met"
    print(f"\nefficiency target >= {TARGET_EFFICIENCY:.0%} without TTA: {verdict} (best {best_none:.0%})")
    print("\n## TTA cost vs passes (batch 1; work = executed FLOPs relative to `none`)\n")
    print("| TTA | passes | work ratio | time ratio | time / work |")
    print("|---|---|---|---|---|")
    base = next(r for r in rows if r[0] == "none" and r[1] == batches[0])
    for r in rows:
        if r[1] != batches[0] or r[9] != tile:
            continue
        work, tratio = r[5] / base[5], r[3] / base[3]
        print(f"| {r[0]} | {r[2]} | {work:.2f} | {tratio:.2f} | {tratio / work:.2f} |")
    print("\n(time / work near 1: TTA costs in proportion to its passes; multicrop's passes run on a canvas "
          "half a tile larger, so its work ratio exceeds its pass count.)")


# ---------------------------------------------------------------------------------------------- memory


def _proc_status_gb(field: str) -> float:
    # VmHWM/VmRSS belong to this process's own memory map; getrusage's ru_maxrss survives exec on Linux and
    # would report the parent's size for a small child.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def volume_child(args: argparse.Namespace) -> None:
    """Run in a subprocess: predict a synthetic int16 CT-like volume; print peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    predictor = Predictor.from_bundle(args.bundle[0], device="cpu")
    if args.volume_model == "cheap":  # same class count, next to no compute: the pipeline's own memory
        k, c = predictor.num_classes, predictor.cfg.data.input_channels
        predictor = Predictor([torch.nn.Conv2d(c, k, 1)], predictor.cfg, predictor.labels, device="cpu")
    rng = np.random.default_rng(0)
    z = args.slices
    vol = rng.integers(-1000, 1500, (z, 512, 512), dtype=np.int16)  # HU-like range, no float temporary
    scan = Scan(vol, Geometry(spacing=(0.8, 0.8, 1.5), origin=(0.0,) * 3, direction=tuple(np.eye(3).ravel()),
                              size=(z, 512, 512)), "synthetic.nii.gz")
    base = _proc_status_gb("VmRSS")
    t = time.perf_counter()
    pred = predictor.predict_scan(scan, tta="none")
    seconds = time.perf_counter() - t
    peak = _proc_status_gb("VmHWM")
    print(json.dumps({"slices": z, "model": args.volume_model, "peak_gb": peak, "before_gb": base,
                      "seconds": seconds, "mask_shape": list(pred.mask.shape)}))


def run_volume_child(args: argparse.Namespace, slices: int, model: str) -> dict:
    cmd = [sys.executable, __file__, "--_volume-child", "--slices", str(slices), "--volume-model", model,
           "--threads", str(args.threads), "--bundle", str(args.bundle[0])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"volume child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(args: argparse.Namespace) -> None:
    print("\n## Peak RAM, 2.5D prediction of a 512×512×Z int16 volume (child process peak RSS)\n", flush=True)
    runs = [run_volume_child(args, args.slices, args.volume_model)]
    if args.volume_model == "cheap":
        runs += [run_volume_child(args, 16, "cheap"), run_volume_child(args, 16, "real")]
    print("| slices | network | peak RSS GB (VmHWM) | RSS before predict GB | seconds |")
    print("|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['slices']} | {r['model']} | {r['peak_gb']:.2f} | {r['before_gb']:.2f} | {r['seconds']:.1f} |")
    peak = runs[0]["peak_gb"]
    if args.volume_model == "cheap":
        activations = max(0.0, (runs[2]["peak_gb"] - runs[2]["before_gb"]) - (runs[1]["peak_gb"] - runs[1]["before_gb"]))
        peak += activations
        print(f"\nreal network's extra memory (16-slice real - stand-in): {activations:.2f} GB; "
              f"estimated peak for {args.slices} slices with the real network: {peak:.2f} GB")
    verdict = "met" if peak < TARGET_RAM_GB else "NOT met"
    print(f"volume RAM target < {TARGET_RAM_GB:.0f} GB: {verdict} ({peak:.2f} GB)")


# ---------------------------------------------------------------------------------------------- accuracy


def second_member(bundle: Path, work: Path, epochs: int | None) -> Path:
    """A bundle with the same config and another seed (trained once, then reused)."""
    from medseg.bundle import load_bundle
    from medseg.engine.train import train

    first = load_bundle(bundle)
    out = work / f"member2-{first.weights_hash[:12]}"  # one cached partner per first member, never another's
    if (out / "bundle" / "config.yaml").is_file():
        return out / "bundle"
    cfg = first.config
    update = {"seed": cfg.train.seed + 1}
    if epochs:
        update["epochs"] = epochs
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=update),
                                 "model": cfg.model.model_copy(update={"pretrained": "imagenet-offline"})})
    out.mkdir(parents=True, exist_ok=True)  # the first bundle's folds, so no validation image is trained on
    (out / "splits.json").write_text((Path(bundle) / "splits.json").read_text())
    print(f"training a second member ({cfg.train.epochs} epochs, seed {cfg.train.seed}) into {out} ...", flush=True)
    t = time.time()
    result = train(cfg, out, progress=False)
    print(f"  done in {(time.time() - t) / 60:.1f} min, val Dice {result.best_val_dice:.3f}", flush=True)
    return result.bundle


def dice_table(args: argparse.Namespace) -> None:
    from medseg.bundle import load_bundle
    from medseg.data import discover_cases, train_val_ids
    from medseg.data.preprocess import map_labels
    from medseg.io import read_scan
    from medseg.metrics import per_label_metrics

    bundles = [load_bundle(b) for b in args.bundle]
    cfg = bundles[0].config
    members = [Predictor.from_bundle(b, device="cpu") for b in bundles]
    models = [m for p in members for m in p.members]
    if len(models) < 2:
        try:
            extra = Predictor.from_bundle(second_member(bundles[0].path, args.work, args.second_member_epochs), "cpu")
            models += extra.members
        except Exception as e:  # report and go on with the single-model rows
            print(f"no second member (training failed: {type(e).__name__}: {e}); ensemble rows skipped")
    splits = json.loads((bundles[0].path / "splits.json").read_text())["folds"]
    _, val_ids = train_val_ids(splits, cfg.data.fold)
    cases = [c for c in discover_cases(cfg.data.root, cfg.data.images_dir, cfg.data.masks_dir) if c.id in set(val_ids)]
    single = Predictor(models[:1], cfg, members[0].labels, members[0].temperature, "cpu")
    ensemble = Predictor(models[:2], cfg, members[0].labels, members[0].temperature, "cpu")
    settings = [("single", "none", single), ("single", "flips", single), ("single", "multicrop", single)]
    if len(models) >= 2:  # the second member alone too: an ensemble must beat each of its members, not one
        second = Predictor(models[1:2], cfg, members[0].labels, members[0].temperature, "cpu")
        settings += [("member 2 alone", "none", second), ("ensemble of 2", "none", ensemble),
                     ("ensemble of 2", "flips", ensemble)]
    if args.full_tta:
        settings.append(("single", "full", single))
    if args.dice_rows:  # e.g. "single:none,single:multicrop": re-measure some rows only (plain first, as baseline)
        wanted = [tuple(r.split(":")) for r in args.dice_rows.split(",")]
        settings = [s for w in wanted for s in settings if (s[0], s[1]) == w]
    print(f"\n## Dice (label 1) on the bundle's validation split: {len(cases)} DSB2018 images\n", flush=True)
    scans = [(read_scan(c.image), c) for c in cases]
    targets = [map_labels(read_scan(c.mask), cfg.data.label_map, s.spatial_shape, c.mask.name) for s, c in scans]
    results = []
    for who, mode, predictor in settings:
        t = time.perf_counter()
        dices = []
        for (scan, _), target in zip(scans, targets, strict=True):
            mask = predictor.predict_scan(scan, tta=mode).mask
            dices.append(per_label_metrics(mask, target, cfg.data.num_classes, hd95=False)[1]["dice"])
        results.append((who, mode, len(predictor.members) * len(predictor.views((256, 256), mode)),
                        float(np.mean(dices)), np.array(dices), time.perf_counter() - t))
    base = results[0][4]
    print("| model | TTA | passes | mean Dice | gain vs single plain | images improved | seconds |")
    print("|---|---|---|---|---|---|---|")
    for who, mode, passes, mean, dices, seconds in results:
        better = int(np.sum(dices > base + 1e-6))
        print(f"| {who} | {mode} | {passes} | {mean:.4f} | {mean - results[0][3]:+.4f} | {better}/{len(dices)} | "
              f"{seconds:.1f} |")


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, action="append", help="bundle(s); members of all are ensembled")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per setting (after one warm-up)")
    ap.add_argument("--modes", default="none,flips,multicrop")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--backend", default="torch", help="torch | compile | onnxruntime (inference.backend)")
    ap.add_argument("--tile", type=int, default=0, help="tile for the speed tables (0: the bundle's)")
    ap.add_argument("--whole-tile", type=int, default=512, help="also time tta=none with this tile (0: skip)")
    ap.add_argument("--slices", type=int, default=300, help="volume depth for the RAM measurement")
    ap.add_argument("--volume-model", choices=["cheap", "real"], default="cheap")
    ap.add_argument("--second-member-epochs", type=int, default=None, help="default: the bundle's epochs")
    ap.add_argument("--work", type=Path, default=REPO / "outputs/bench/inference")
    ap.add_argument("--full-tta", action="store_true", help="also score tta=full (20 passes) for Dice")
    ap.add_argument("--dice-rows", default="", help="only these Dice rows, e.g. single:none,single:multicrop")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: speed,memory,dice")
    ap.add_argument("--_volume-child", dest="volume_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.bundle = args.bundle or [REPO / "outputs/demo/bundle"]
    if not Path(args.bundle[0]).exists():
        sys.exit(f"{args.bundle[0]}: no bundle; run `make demo` first or pass --bundle")
    torch.set_num_threads(args.threads)
    if args.volume_child:
        volume_child(args)
        return
    skip = set(filter(None, args.skip.split(",")))
    start = time.time()
    print(f"# medseg inference benchmark\n\nbundle(s): {', '.join(str(b) for b in args.bundle)}; torch "
          f"{torch.__version__}; threads {torch.get_num_threads()}; CPU cores {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    peak = matmul_flops()
    print(f"matmul 2048³ fp32: {peak / 1e9:.1f} GFLOP/s (the efficiency denominator)\n", flush=True)
    if "speed" not in skip:
        predictor = Predictor.from_bundle(args.bundle[0], device="cpu", backend=args.backend)
        if args.tile:
            predictor.inference.tile_size = (args.tile, args.tile)
        speed_tables(predictor, args.modes.split(","), [int(b) for b in args.batches.split(",")], args.repeats, peak,
                     args.whole_tile)
    if "memory" not in skip:
        memory_table(args)
    if "dice" not in skip:
        dice_table(args)
    print(f"\ntotal {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
