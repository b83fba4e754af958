"""medseg command line (typer). Commands parse arguments, load the config, and call the library."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medseg.errors import MedsegError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Medical image segmentation: train, predict, evaluate.")
console = Console(stderr=True)
STATE = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    STATE["debug"] = debug
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)


def _fail(err: Exception) -> None:
    if STATE["debug"]:
        raise err
    console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _load_cfg(config: Path, data: Path | None, sets: list[str] | None, epochs: int | None = None, limit_cases: int | None = None):
    from medseg.config import load_config

    overrides = list(sets or [])
    if data is not None:
        overrides.append(f"data.root={data.resolve()}")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if limit_cases is not None:
        overrides.append(f"data.limit_cases={limit_cases}")
    return load_config(config, overrides)


Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set train.lr=3e-4")]


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Experiment YAML")],
    data: Annotated[Path | None, typer.Option(help="Dataset folder with images/ and masks/")] = None,
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("outputs/train"),
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs")] = None,
    limit_cases: Annotated[int | None, typer.Option(help="Use only the first N cases (quick trials)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt")] = False,
    devices: Annotated[int | None, typer.Option(help="Number of devices (processes) for DDP")] = None,
    strategy: Annotated[str | None, typer.Option(help="Lightning strategy, e.g. ddp")] = None,
    set_: Sets = None,
) -> None:
    """Train a model; writes OUT/bundle, OUT/progress.png and OUT/metrics.csv."""
    try:
        sets = list(set_ or [])
        if devices is not None:
            sets.append(f"train.devices={devices}")
        if strategy is not None:
            sets.append(f"train.strategy={strategy}")
        cfg = _load_cfg(config, data, sets, epochs, limit_cases)
        from medseg.engine.train import train as run_train

        result = run_train(cfg, out, resume=resume)
    except MedsegError as e:
        _fail(e)
        return
    console.print(
        f"done in {result.seconds / 60:.1f} min: best val Dice {result.best_val_dice:.4f}; bundle at {result.bundle}",
        highlight=False,
    )


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files, zips and DICOM folders are one input each; other folders contribute their scans."""
    from medseg.data.datalist import SCAN_SUFFIXES
    from medseg.io import is_dicom_folder

    out: list[Path] = []
    for p in inputs:
        if p.is_dir() and not is_dicom_folder(p):
            kids = sorted(c for c in p.iterdir() if not c.name.startswith(".") and (c.is_dir() or c.name.lower().endswith(SCAN_SUFFIXES)))
            out.extend(kids)
        else:
            out.append(p)
    return out


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")],
    inputs: Annotated[list[Path], typer.Argument(help="Files, folders, DICOM folders or zips")],
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("outputs/predict"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    tta: Annotated[str | None, typer.Option(help="none | flips | multicrop | full")] = None,
) -> None:
    """Segment scans: one mask per input (PNG for 2D images, NIfTI for volumes), plus overlays for 2D."""
    from rich.progress import Progress

    from medseg.inference import Predictor
    from medseg.inference.outputs import write_prediction_outputs
    from medseg.io import read_scan

    try:
        predictor = Predictor.from_bundle(bundle, device=device)
        if tta is not None:
            predictor.cfg.inference.tta = tta
    except MedsegError as e:
        _fail(e)
        return
    items = expand_inputs(inputs)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, str]] = []
    with Progress(console=console, transient=False) as bar:
        task = bar.add_task("predicting", total=len(items))
        for item in items:
            try:
                scan = read_scan(item)
                pred = predictor.predict_scan(scan)
                write_prediction_outputs(
                    scan, pred, predictor.labels, out, name=_output_stem(item), label_map=predictor.cfg.data.label_map
                )
            except MedsegError as e:
                failures.append((item.name, str(e)))
            except Exception as e:  # one broken case must not stop the other 99
                if STATE["debug"]:
                    raise
                failures.append((item.name, f"{type(e).__name__}: {e}"))
            bar.advance(task)
    console.print(f"{len(items) - len(failures)} of {len(items)} inputs segmented into {out}", highlight=False)
    if failures:
        for name, why in failures:
            console.print(f"[red]failed[/red] {name}: {why}", highlight=False)
        raise typer.Exit(1)


def _output_stem(path: Path) -> str:
    from medseg.data.datalist import scan_stem

    return scan_stem(path)


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Model bundle")],
    data: Annotated[Path | None, typer.Option(help="Dataset folder (default: the one the bundle was trained on)")] = None,
    split: Annotated[str, typer.Option(help="val | train | all")] = "val",
    out: Annotated[Path | None, typer.Option(help="CSV path for per-case metrics")] = None,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Per-case, per-label Dice and HD95 (MONAI) on a dataset split; prints a table, writes a CSV."""
    from medseg.engine.evaluate import evaluate_bundle

    try:
        rows, summary = evaluate_bundle(bundle, data, split, device)
    except MedsegError as e:
        _fail(e)
        return
    table = Table(title=f"{bundle.name}: {split} split, {len(rows)} cases")
    for col in ("case", "label", "dice", "hd95"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["case"], r["label"], f"{r['dice']:.4f}", f"{r['hd95']:.2f}")
    for label, (mean, sd) in summary.items():
        table.add_row("[b]mean ± sd[/b]", label, f"{mean:.4f} ± {sd:.4f}", "")
    Console().print(table)
    out = out or Path(bundle).parent / f"evaluate_{split}.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    console.print(f"per-case metrics written to {out}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
