"""Inference backends and end-to-end prediction (issue: performance).

Three tables, each from this one run:

1. **Backends** (`medseg.inference.backends`): per backend, the set-up cost (first 512² prediction: compile or
   ONNX export included), milliseconds per 512² image (2D, batch of tiles) and per 512² slice of a 2.5D volume
   (``inference.batch_size`` slices per call), and the largest probability difference from eager ``torch``.
2. **2D end to end**: a 512² PNG on disk -> mask (and overlay) written, in this process, against the model time
   of the same prediction (``predict_image`` on the prepared input); target: within 1.2x.
3. **CT end to end**: ``medseg predict BUNDLE SERIES/`` in a child process on a 512×512×300 DICOM series
   (uncompressed, built from the real CT series in ../shared/datasets/dicom_ct_series stacked 15 times),
   wall time and the child's peak RSS (targets: < 60 s, < 3 GB on the 2-core CPU).

The networks are the default architecture (UNet, EfficientNet-Lite0, 2.5D with one context slice for the CT)
with random weights: speed does not depend on the weights. Run alone (no other CPU-heavy work):

    .venv/bin/python benchmarks/backends.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("MEDSEG_DATASETS", REPO.parent / "shared" / "datasets"))
BACKENDS = ("torch", "compile", "onnxruntime")


def make_bundle(out: Path, ct: bool) -> Path:
    """An untrained bundle of the default network: a 2D RGB one, or a 2.5D CT one (HU window)."""
    from medseg.bundle import save_bundle
    from medseg.config import load_config
    from medseg.models import build_model

    sets = ["model.pretrained=none", "data.labels={0: background, 1: structure}", "plan=false"]
    if ct:
        sets += ["data.channels=1", "data.context_slices=1", "data.intensity=ct_window"]
    else:
        sets += ["data.channels=3"]
    cfg = load_config(None, sets)
    torch.manual_seed(0)
    state = build_model(cfg.model, cfg.data.input_channels, cfg.data.num_classes).state_dict()
    return save_bundle(out, cfg, {"model": state}, {"input_channels": cfg.data.input_channels}, "# benchmark (untrained)")


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def backend_rows(bundle_2d: Path, bundle_ct: Path, backends: list[str], repeats: int) -> list[dict]:
    from medseg.inference import Predictor

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((3, 512, 512), dtype=np.float32))
    reference = None
    rows = []
    for backend in backends:
        p2 = Predictor.from_bundle(bundle_2d, device="cpu", backend=backend)
        t = time.perf_counter()
        probs = p2.predict_probs(image)  # first call: oneDNN primitives, compile or ONNX export
        setup = time.perf_counter() - t
        if reference is None:
            reference = probs
        diff = float(np.abs(probs - reference).max())
        per_image = median_time(lambda p=p2: p.predict_probs(image), repeats)
        pct = Predictor.from_bundle(bundle_ct, device="cpu", backend=backend)
        batch = pct.inference.batch_size  # slices per network call (the device's default when unset)
        volume = torch.from_numpy(rng.random((pct.cfg.data.channels, 8, 512, 512), dtype=np.float32))
        pct.predict_probs(volume)  # warm-up for the volume shapes
        per_slice = median_time(lambda p=pct, v=volume: p.predict_probs(v), repeats) / 8
        row = {"backend": backend, "setup_s": round(setup, 1), "ms_per_image_512": round(1000 * per_image),
               "ms_per_slice_512_batch": round(1000 * per_slice), "batch": batch, "max_abs_dprob": diff}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def e2e_2d(bundle_2d: Path, backend: str, work: Path, repeats: int) -> dict:
    from PIL import Image

    from medseg.inference import Predictor
    from medseg.inference.outputs import ModelStamp, write_prediction_outputs
    from medseg.io import read_scan

    src = sorted((DATASETS / "dsb2018_nuclei" / "images").iterdir())[0]
    png = work / "image.png"
    Image.open(src).convert("RGB").resize((512, 512), Image.BILINEAR).save(png)
    predictor = Predictor.from_bundle(bundle_2d, device="cpu", backend=backend)
    x, _ = predictor.prepare(read_scan(png))
    predictor.predict_image(x)  # warm-up (compile / export / oneDNN)

    def end_to_end() -> None:
        scan = read_scan(png)
        pred = predictor.predict_scan(scan)
        write_prediction_outputs(scan, pred, predictor.labels, work / "out", name="image",
                                 label_map=predictor.cfg.data.label_map,
                             model=ModelStamp(predictor.name, predictor.weights_hash))

    model = median_time(lambda: predictor.predict_image(x), repeats)
    total = median_time(end_to_end, repeats)
    row = {"backend": backend, "model_s": round(model, 3), "end_to_end_s": round(total, 3),
           "ratio": round(total / model, 2)}
    print(json.dumps(row), flush=True)
    return row


def make_ct_series(dest: Path, repeat: int) -> Path:
    """The real CT series, re-encoded uncompressed (12-bit stored, intercept -1024, as scanners export) and
    stacked ``repeat`` times along z: 20 x repeat slices of 512², real headers, fresh UIDs."""
    import pydicom
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    sources = sorted((DATASETS / "dicom_ct_series" / "dicom").glob("*.dcm"))
    hu = sitk.GetArrayFromImage(sitk.ReadImage([str(p) for p in sources]))  # slice j is sources[j]
    order = np.argsort([float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in sources])
    headers, hu = [pydicom.dcmread(sources[j]) for j in order], hu[order]
    z0 = float(headers[0].ImagePositionPatient[2])
    spacing = float(headers[1].ImagePositionPatient[2]) - z0
    dest.mkdir(parents=True)
    series = generate_uid()
    for r in range(repeat):
        for i, ds in enumerate(headers):
            k = r * len(headers) + i
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = np.clip(hu[i].astype(np.int32) + 1024, 0, 4095).astype(np.uint16).tobytes()
            ds["PixelData"].VR = "OW"
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            pos = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [pos[0], pos[1], z0 + k * spacing]
            ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series, generate_uid(), k + 1
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(dest / f"CT{k:04d}.dcm", enforce_file_format=True)
    return dest


def e2e_ct(bundle_ct: Path, series: Path, backend: str, work: Path) -> dict:
    out = work / f"ct-{backend}"
    cmd = [sys.executable, "-m", "medseg.cli", "predict", str(bundle_ct), str(series), "--out", str(out),
           "--device", "cpu", "--backend", backend]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss, KiB on Linux)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"medseg predict failed:\n{output[-3000:]}")
    masks = list(out.glob("*mask*"))
    row = {"backend": backend, "slices": len(list(series.iterdir())), "wall_s": round(wall, 1),
           "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "masks": len(masks)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ct-repeat", type=int, default=15, help="copies of the 20-slice series (15: 300 slices)")
    ap.add_argument("--ct-backends", default="torch,compile,onnxruntime")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: backends,2d,ct")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results/backends.jsonl")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    backends = args.backends.split(",")
    work = Path(tempfile.mkdtemp(prefix="medseg-backends-"))
    record: dict = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                    "torch": torch.__version__}
    try:
        b2d, bct = make_bundle(work / "b2d", ct=False), make_bundle(work / "bct", ct=True)
        if "backends" not in skip:
            record["backends"] = backend_rows(b2d, bct, backends, args.repeats)
        if "2d" not in skip:
            record["e2e_2d"] = [e2e_2d(b2d, b, work, args.repeats) for b in backends]
        if "ct" not in skip:
            series = make_ct_series(work / "series", args.ct_repeat)
            record["e2e_ct"] = [e2e_ct(bct, series, b, work) for b in args.ct_backends.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if "backends" in record:
        print("\n| backend | set-up s (first 512² call) | ms / 512² image | ms / 512² slice (2.5D) | max abs Δp vs torch |")
        print("|---|---|---|---|---|")
        for r in record["backends"]:
            print(f"| {r['backend']} | {r['setup_s']} | {r['ms_per_image_512']} | {r['ms_per_slice_512_batch']} | "
                  f"{r['max_abs_dprob']:.1e} |")
    if "e2e_2d" in record:
        print("\n| backend | 512² PNG: model s | read → mask written s | ratio (target ≤ 1.2) |\n|---|---|---|---|")
        for r in record["e2e_2d"]:
            print(f"| {r['backend']} | {r['model_s']} | {r['end_to_end_s']} | {r['ratio']} |")
    if "e2e_ct" in record:
        print("\n| backend | CT DICOM slices | `medseg predict` wall s (target < 60) | peak RSS GB (target < 3) |\n|---|---|---|---|")
        for r in record["e2e_ct"]:
            print(f"| {r['backend']} | {r['slices']} | {r['wall_s']} | {r['peak_rss_gb']} |")


if __name__ == "__main__":
    main()
