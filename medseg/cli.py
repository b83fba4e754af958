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
    _log_to_stderr()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    _route_lightning_logs()


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not when the handler was made), so a
    redirected or replaced stderr — a test runner's, a notebook's — always receives the messages."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always answers
        pass


def _log_to_stderr() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def _route_lightning_logs() -> None:
    """Lightning gives its loggers a handler on the stderr of the moment it is imported, and no propagation:
    route them through ours instead (one line per message, to the current stderr). Call after importing it."""
    import sys as _sys

    for name in ("lightning.pytorch", "lightning.fabric"):
        if name in _sys.modules:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
            logger.setLevel(logging.WARNING)


def _fail(err: Exception) -> None:
    if STATE["debug"]:
        raise err
    console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _load_cfg(config: Path | None, data: Path | None, sets: list[str] | None, epochs: int | None = None,
              limit_cases: int | None = None):
    from medseg.config import load_config

    if config is None and data is None:
        raise MedsegError("give an experiment YAML, or --data DIR to plan everything from the data")
    overrides = list(sets or [])
    if data is not None:
        overrides.append(f"data.root={data.resolve()}")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if limit_cases is not None:
        overrides.append(f"data.limit_cases={limit_cases}")
    return load_config(config, overrides)


Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set train.lr=3e-4")]
# Options several commands share (same name, type and help everywhere).
DataOpt = Annotated[Path | None, typer.Option(help="Dataset folder with images/ and masks/")]
EpochsOpt = Annotated[int | None, typer.Option(help="Override train.epochs")]
LimitCasesOpt = Annotated[int | None, typer.Option(help="Use only the first N cases")]


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="Experiment YAML (optional with --data: then everything is planned)")] = None,
    data: DataOpt = None,
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("outputs/train"),
    epochs: EpochsOpt = None,
    limit_cases: Annotated[int | None, typer.Option(help="Use only the first N cases (quick trials)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt")] = False,
    devices: Annotated[int | None, typer.Option(help="Number of devices (processes) for DDP")] = None,
    strategy: Annotated[str | None, typer.Option(help="Lightning strategy, e.g. ddp")] = None,
    fold: Annotated[int | None, typer.Option(help="Validation fold (data.fold)")] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic algorithms (train.deterministic)")] = False,
    max_minutes: Annotated[float | None, typer.Option(help="Wall-clock budget of the whole run (train.budget_minutes): the "
                                                     "schedule is laid over it and ends annealed, with its bundle")] = None,
    set_: Sets = None,
) -> None:
    """Train a model; writes OUT/bundle, OUT/plan.yaml, OUT/progress.png, OUT/metrics.csv, OUT/run_info.json and a
    diagnosis. Every data-dependent setting the config leaves open is planned from the data (see `medseg plan`)."""
    try:
        sets = list(set_ or [])
        if devices is not None:
            sets.append(f"train.devices={devices}")
        if strategy is not None:
            sets.append(f"train.strategy={strategy}")
        if fold is not None:
            sets.append(f"data.fold={fold}")
        if deterministic:
            sets.append("train.deterministic=true")
        if max_minutes is not None:
            sets.append(f"train.budget_minutes={max_minutes}")
        cfg = _load_cfg(config, data, sets, epochs, limit_cases)
        from medseg.engine.train import train as run_train

        _route_lightning_logs()
        result = run_train(cfg, out, resume=resume)
    except MedsegError as e:
        _fail(e)
        return
    console.print(
        f"done in {result.seconds / 60:.1f} min: val Dice {result.val_dice:.4f} (the shipped "
        f"{'+'.join(result.members)} on every validation case); bundle at {result.bundle}",
        highlight=False,
    )
    for problem in result.left_out:
        console.print(f"[yellow]left out[/yellow] {problem}", highlight=False, soft_wrap=True)
    console.print("[b]learning curves:[/b]", highlight=False)
    for f in result.findings:
        console.print(f"  [{f.code}] {f.message}", highlight=False, soft_wrap=True, markup=False)


@app.command()
def plan(
    data: Annotated[Path, typer.Argument(help="Dataset folder with images/ and masks/")],
    config: Annotated[Path | None, typer.Option(help="Experiment YAML whose keys win over the plan")] = None,
    out: Annotated[Path, typer.Option(help="Folder for fingerprint.json and plan.yaml")] = Path("outputs/plan"),
    max_minutes: Annotated[float | None, typer.Option(help="Wall-clock budget to plan for")] = None,
    device: Annotated[str, typer.Option(help="Device to plan for: auto | cpu | cuda")] = "auto",
    set_: Sets = None,
) -> None:
    """Fingerprint a dataset and print the training plan (scale, patch, batch, intensity, sampling, schedule)."""
    try:
        sets = list(set_ or [])
        if max_minutes is not None:
            sets.append(f"train.budget_minutes={max_minutes}")
        if device != "auto":
            sets.append(f"train.accelerator={'gpu' if device == 'cuda' else device}")
        cfg = _load_cfg(config, data, sets)
        from medseg.engine.train import load_cases
        from medseg.planning import plan_run, summary_lines

        planned = plan_run(cfg, load_cases(cfg), out)
    except MedsegError as e:
        _fail(e)
        return
    for line in summary_lines(planned.fingerprint):
        console.print(line, highlight=False, markup=False)
    table = Table(title=f"plan for {data.name} ({planned.plan.summary.get('device')})")
    for col in ("key", "value", "why"):
        table.add_column(col, overflow="fold")
    for key, value, why in planned.plan.rows():
        mark = "" if key in planned.applied else " (yours wins)"
        table.add_row(key + mark, value, why)
    Console().print(table)
    for note in planned.plan.notes:
        console.print(note, highlight=False, markup=False)
    console.print(f"fingerprint and plan written to {out}/fingerprint.json and {out}/plan.yaml", highlight=False)


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files, zips and DICOM folders are one input each; other folders contribute their scans."""
    from medseg.io import is_dicom_folder
    from medseg.io.formats import SCAN_SUFFIXES

    out: list[Path] = []
    for p in inputs:
        if p.is_dir() and not is_dicom_folder(p, recursive=False):  # DICOM files of its own: one series input
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
    tta: Annotated[str | None, typer.Option(help="none | flips | multicrop | full (default: the bundle's)")] = None,
    backend: Annotated[str | None, typer.Option(
        help="auto | torch | compile | onnxruntime: what runs the network (default: the bundle's, auto)")] = None,
    mask_values: Annotated[str, typer.Option(
        "--mask-values", help="indices: class indices 0..K-1 | raw: the training masks' label values (e.g. 0/255)")] = "indices",
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write class probabilities")] = False,
    uncertainty: Annotated[bool, typer.Option("--uncertainty", help="Also write the uncertainty map")] = False,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg", help="DICOM inputs: also write a DICOM SEG")] = False,
    anonymize: Annotated[bool, typer.Option("--anonymize", help="De-identify the DICOM SEG (PS3.15 basic)")] = False,
    allow_missing_slices: Annotated[bool, typer.Option(
        "--allow-missing-slices",
        help="Segment DICOM series with gaps or unreadable slices anyway (positions and volumes approximate)")] = False,
    run_anyway: Annotated[bool, typer.Option(
        "--run-anyway",
        help="Segment scans that do not look like the model's training data (refused otherwise; recorded in "
        "<name>_compatibility.json)")] = False,
) -> None:
    """Segment scans: one mask per input (PNG for 2D images, NIfTI for volumes), plus overlays for 2D."""
    import json

    from rich.progress import Progress

    from medseg.bundle import load_bundle
    from medseg.inference import Predictor
    from medseg.inference.backends import Backend
    from medseg.inference.compatibility import check_scan
    from medseg.inference.outputs import MaskValues, ModelStamp, write_prediction_outputs
    from medseg.io import read_scan

    try:
        tta_mode = _tta_option(tta)
        if mask_values not in tuple(MaskValues):
            raise MedsegError(f"--mask-values {mask_values!r}: use {' or '.join(MaskValues)}")
        if backend is not None and backend not in tuple(Backend):
            raise MedsegError(f"--backend {backend!r}: use {', '.join(Backend)}")
        loaded = load_bundle(bundle)
        fingerprint = loaded.preprocessing.get("training_fingerprint")
        predictor = Predictor.from_bundle(loaded, device=device, backend=backend)
    except MedsegError as e:
        _fail(e)
        return
    items = expand_inputs(inputs)
    stems = _unique_output_stems(items)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, str]] = []
    with Progress(console=console, transient=False) as bar:
        task = bar.add_task("predicting", total=len(items))
        for item in items:
            try:
                scan = read_scan(item, allow_missing_slices=allow_missing_slices)
                fit = check_scan(scan, fingerprint, predictor.cfg.data)
                if not fit.ok and not run_anyway:
                    raise MedsegError(f"does not fit this model: {fit.text()} Add --run-anyway to segment it anyway.")
                if not fit.ok:
                    console.print(f"[yellow]running anyway[/yellow] {item.name}: {fit.text()}", highlight=False)
                    (out / f"{stems[item]}_compatibility.json").write_text(json.dumps(
                        {"run_anyway": True, "problems": list(fit.problems), "weights_hash": predictor.weights_hash},
                        indent=1))
                pred = predictor.predict_scan(scan, tta=tta_mode)
                write_prediction_outputs(
                    scan, pred, predictor.labels, out, name=stems[item], label_map=predictor.cfg.data.label_map,
                    model=ModelStamp(predictor.name, predictor.weights_hash), values=mask_values,
                    probabilities=probabilities, uncertainty=uncertainty, dicom_seg=dicom_seg, anonymize=anonymize,
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


def _tta_option(tta: str | None):
    """``--tta`` as a TTAMode (None: the bundle's), or a one-line error naming the choices."""
    from medseg.config import TTAMode

    if tta is None:
        return None
    try:
        return TTAMode(tta)
    except ValueError:
        raise MedsegError(f"--tta {tta!r}: use {', '.join(TTAMode)}") from None


@app.command()
def finetune(
    bundle: Annotated[Path, typer.Argument(help="Model bundle to start from (folder or .zip)")],
    data: Annotated[Path, typer.Option(help="Review folder written by the app (images/, masks/, reviews.csv)")],
    out: Annotated[Path | None, typer.Option(help="New bundle (default: <bundle>-v<N> beside the bundle)")] = None,
    max_minutes: Annotated[float, typer.Option(help="Wall-clock budget of the fine-tuning run")] = 10.0,
    with_original: Annotated[Path | None, typer.Option(
        "--with-original", help="Also train on this dataset (images/ + masks/), e.g. the bundle's original data")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (for the before/after Dice)")] = "auto",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override key=value (repeatable)")] = None,
) -> None:
    """Fine-tune a model on reviewed cases into its next version (before/after Dice on held-aside reviews)."""
    from medseg.bundle import load_bundle
    from medseg.engine.finetune import finetune as run_finetune
    from medseg.engine.finetune import next_version_path

    try:
        parent = load_bundle(bundle)
        target = out or next_version_path(bundle, parent)
        result = run_finetune(bundle, data, target, max_minutes=max_minutes, with_original=with_original,
                              device=device, overrides=set_)
    except MedsegError as e:
        _fail(e)
        return
    console.print(
        f"version {result.version} written to {result.bundle}: trained on {result.n_reviewed_train} reviewed"
        f"{f' + {result.n_original} original' if result.n_original else ''} cases; Dice on {result.n_held_aside} "
        f"held-aside reviewed case(s) {result.dice_before:.4f} -> {result.dice_after:.4f}", highlight=False)


@app.command()
def distill(
    teacher: Annotated[Path, typer.Argument(help="Teacher bundle: several members (folds, snapshots) and/or TTA")],
    data: Annotated[Path, typer.Option(help="Dataset folder with images/ and masks/")],
    out: Annotated[Path, typer.Option(help="Run folder; the student bundle is OUT/bundle")] = Path("outputs/distill"),
    student_encoder: Annotated[str | None, typer.Option(help="Student encoder (default: the teacher's), e.g. "
                                                        "timm-tf_efficientnet_lite0")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Wall-clock budget of the student's training")] = 10.0,
    unlabeled: Annotated[Path | None, typer.Option(help="Images without masks (a folder, or one with images/): "
                                                   "the teacher labels them")] = None,
    teacher_tta: Annotated[str | None, typer.Option(help="TTA of the teacher's targets: none | flips | multicrop | "
                                                    "full (default: the teacher bundle's)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (teacher predictions)")] = "auto",
    set_: Sets = None,
) -> None:
    """Train one model on an ensemble's soft predictions (+ the labels); its model card gives both Dice figures."""
    from medseg.engine.distill import distill as run_distill

    try:
        _route_lightning_logs()
        result = run_distill(teacher, data, out, student_encoder=student_encoder, max_minutes=max_minutes,
                             unlabeled=unlabeled, teacher_tta=_tta_option(teacher_tta), device=device, overrides=set_)
    except MedsegError as e:
        _fail(e)
        return
    console.print(
        f"student written to {result.bundle} in {result.seconds / 60:.1f} min: Dice on {result.n_val} validation "
        f"case(s) teacher {result.teacher_dice:.4f} ({result.teacher_passes} passes per image), student "
        f"{result.student_dice:.4f} (1 pass); {result.targets_computed} teacher target(s) computed", highlight=False)


def _unique_output_stems(items: list[Path]) -> dict[Path, str]:
    """Output stem per input; inputs that share one (``a.png``, ``a.tif``, folder ``a`` and ``a.zip``) get their
    suffix appended (``a_tif``) so no output overwrites another."""
    stems = {item: _output_stem(item) for item in items}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    taken = set(stems.values())
    for item in items:
        if counts[stems[item]] > 1:
            tail = item.name[len(stems[item]):].lstrip(".").replace(".", "_") or "dir"
            candidate, n = f"{stems[item]}_{tail}", 2
            while candidate in taken:
                candidate, n = f"{stems[item]}_{tail}{n}", n + 1
            taken.add(candidate)
            stems[item] = candidate
    return stems


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
    """Per-case, per-label Dice and HD95 (MONAI) on a dataset split, and AJI / Panoptic Quality / object F1 where the
    data has instance maps (data.instances_dir); prints tables, writes a CSV."""
    from medseg.engine.evaluate import OBJECT_METRIC_NAMES, evaluate_bundle

    try:
        result = evaluate_bundle(bundle, data, split, device)
    except MedsegError as e:
        _fail(e)
        return
    rows, summary = result.rows, result.summary
    table = Table(title=f"{bundle.name}: {split} split, {result.n_cases} cases")
    for col in ("case", "label", "dice", "hd95"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["case"], r["label"], f"{r['dice']:.4f}", f"{r['hd95']:.2f}")
    for label, (mean, sd) in summary.items():
        table.add_row("[b]mean ± sd[/b]", label, f"{mean:.4f} ± {sd:.4f}", "")
    Console().print(table)
    if result.objects:
        objects = Table(title=f"objects (connected components of the foreground vs the instance maps), "
                              f"{len(result.objects)} cases")
        for col in ("case", *OBJECT_METRIC_NAMES.values(), "fused", "objects"):
            objects.add_column(col)
        for o in result.objects:
            objects.add_row(o["case"], *(f"{o[k]:.4f}" for k in OBJECT_METRIC_NAMES), str(o["fused"]), str(o["objects"]))
        means = result.object_summary
        objects.add_row("[b]mean ± sd[/b]", *(f"{means[k][0]:.4f} ± {means[k][1]:.4f}" for k in OBJECT_METRIC_NAMES),
                        str(sum(o["fused"] for o in result.objects)), str(sum(o["objects"] for o in result.objects)))
        Console().print(objects)
    by_case = {o["case"]: {k: v for k, v in o.items() if k != "case"} for o in result.objects}
    rows = [{**r, **by_case.get(r["case"], {})} for r in rows]  # object metrics are per case, on each label's row
    fields = list(dict.fromkeys(k for r in rows for k in r))
    out = out or Path(bundle).parent / f"evaluate_{split}.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    console.print(f"per-case metrics written to {out}", highlight=False)


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip), loaded once", envvar="MEDSEG_BUNDLE")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 in a container)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N (default: auto)")] = None,
    backend: Annotated[str | None, typer.Option(
        help="auto | torch | compile | onnxruntime (default: the bundle's; compile repays itself on many scans)")] = None,
    max_queued: Annotated[int | None, typer.Option(help="Jobs waiting at most; more get 429")] = None,
    max_upload_mb: Annotated[int | None, typer.Option(help="Largest upload in MB; larger get 413")] = None,
    job_ttl: Annotated[float | None, typer.Option(help="Seconds a finished job's files are kept")] = None,
    max_voxels: Annotated[int | None, typer.Option(help="Largest scan decoded, in voxels (default: from the model and memory)")] = None,
    memory_budget_mb: Annotated[int | None, typer.Option(help="MB of decoded scans the queue may hold (default: a quarter of memory)")] = None,
    job_timeout: Annotated[float | None, typer.Option(help="Compute seconds one job may take (default 600)")] = None,
    broker: Annotated[str | None, typer.Option(help="Redis URL of a shared job queue worked by `medseg worker` processes (default: none, one process)")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="With --broker: the folder API replicas and workers share")] = None,
    finetune_dir: Annotated[Path | None, typer.Option(
        help="Turn on fine-tuning (POST /v1/finetune): the folder where fine-tuned versions of the bundle are written "
             "and served from under /versions/<name> (env MEDSEG_SERVICE_FINETUNE_DIR; default: off). With --broker "
             "each version needs its own workers: medseg worker <this folder>/<name>")] = None,
    finetune_max_minutes: Annotated[float | None, typer.Option(
        help="Largest training budget a fine-tuning client may ask for, in minutes (default 30)")] = None,
) -> None:
    """Inference service (FastAPI + uvicorn): POST /v1/segment, GET /v1/jobs/{id} and its mask, report and uncertainty."""
    from medseg.service.server import serve as run_server
    from medseg.service.settings import ServiceSettings

    try:
        settings = ServiceSettings.from_env(
            device=device, backend=backend, max_queued=max_queued, job_ttl_s=job_ttl, max_voxels=max_voxels,
            job_timeout_s=job_timeout, broker=broker, results_dir=results_dir, finetune_dir=finetune_dir,
            finetune_max_minutes=finetune_max_minutes,
            max_upload_bytes=max_upload_mb * 1024 * 1024 if max_upload_mb is not None else None,
            memory_budget_bytes=memory_budget_mb * 1024 * 1024 if memory_budget_mb is not None else None,
        )
    except ValueError as e:
        _fail(MedsegError(str(e)))
        return
    try:
        run_server(bundle, host=host, port=port, settings=settings)
    except MedsegError as e:
        _fail(e)


@app.command()
def worker(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip), the same the API serves", envvar="MEDSEG_BUNDLE")],
    broker: Annotated[str | None, typer.Option(help="Redis URL of the shared queue, e.g. redis://queue:6379/0 (env MEDSEG_SERVICE_BROKER)")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="Folder shared with the API replicas (env MEDSEG_SERVICE_RESULTS_DIR)")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N: one worker per GPU")] = None,
    backend: Annotated[str | None, typer.Option(help="auto | torch | compile | onnxruntime (default: the bundle's)")] = None,
    job_timeout: Annotated[float | None, typer.Option(help="Compute seconds one job may take (default 600)")] = None,
) -> None:
    """Inference worker for the shared job queue: takes jobs that `medseg serve` replicas (with a broker) queued."""
    from medseg.service.settings import ServiceSettings
    from medseg.service.shared_jobs import run_worker

    try:
        settings = ServiceSettings.from_env(broker=broker, results_dir=results_dir, device=device, backend=backend,
                                            job_timeout_s=job_timeout)
        if not settings.broker or not settings.results_dir:
            raise ValueError("medseg worker needs --broker (MEDSEG_SERVICE_BROKER) and --results-dir "
                             "(MEDSEG_SERVICE_RESULTS_DIR)")
        run_worker(bundle, settings)
    except (ValueError, MedsegError) as e:
        _fail(e if isinstance(e, MedsegError) else MedsegError(str(e)))


@app.command("app")
def web_app(
    models: Annotated[Path, typer.Option(help="Folder with model bundles (make demo puts one in models/demo-nuclei)")] = Path("models"),
    port: Annotated[int, typer.Option(help="TCP port")] = 8501,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 in a container)")] = "localhost",
    max_upload_mb: Annotated[int, typer.Option(help="Largest upload in MB", envvar="MEDSEG_MAX_UPLOAD_MB")] = 1024,
) -> None:
    """Clinician web app (Streamlit): upload a scan, see, measure and download its mask."""
    import os
    import subprocess

    # app/ is installed beside medseg/ (same project); found by path so an editable install needs no re-install.
    script = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
    if not script.is_file():
        _fail(MedsegError(f"{script}: the web app is not installed next to medseg"))
        return
    env = {**os.environ, "MEDSEG_MODELS_DIR": str(models.resolve()), "MEDSEG_MAX_UPLOAD_MB": str(max_upload_mb)}
    # Production settings: no error details or tracebacks in the browser, XSRF protection, no usage statistics,
    # no file watcher, the same upload cap on the server as in the app (it derives its zip and voxel caps from it).
    options = {
        "server.port": port, "server.address": host, "server.headless": "true",
        "server.maxUploadSize": max_upload_mb, "server.enableXsrfProtection": "true",
        "server.enableCORS": "true", "server.fileWatcherType": "none", "server.runOnSave": "false",
        "client.showErrorDetails": "none", "client.toolbarMode": "minimal",
        "browser.gatherUsageStats": "false", "global.developmentMode": "false", "theme.base": "light",
    }
    command = [sys.executable, "-m", "streamlit", "run", str(script), *(f"--{k}={v}" for k, v in options.items())]
    console.print(f"medseg app: http://{host}:{port}  (models: {models})", highlight=False)
    try:
        code = subprocess.call(command, env=env)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


@app.command()
def export(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")],
    onnx: Annotated[Path, typer.Option("--onnx", help="Output .onnx file (a .json sidecar is written beside it)")],
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
) -> None:
    """Export a bundle's ensemble to ONNX: (B, C, H, W) in [0, 1], H and W multiples of 32 -> probabilities."""
    from medseg.inference.export import export_onnx

    try:
        path = export_onnx(bundle, onnx, opset=opset)
    except MedsegError as e:
        _fail(e)
        return
    console.print(f"ONNX model written to {path} (sidecar {path}.json)", highlight=False)


@app.command()
def cv(
    config: Annotated[Path, typer.Argument(help="Experiment YAML")],
    folds: Annotated[int | None, typer.Option(help="Number of folds K (default data.folds)")] = None,
    data: DataOpt = None,
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("outputs/cv"),
    epochs: EpochsOpt = None,
    limit_cases: LimitCasesOpt = None,
    resume: Annotated[bool, typer.Option(help="Keep finished folds, resume an interrupted one")] = False,
    max_minutes_per_fold: Annotated[float | None, typer.Option(help="Wall-clock budget per fold (train.budget_minutes): "
                                                              "each fold's schedule is laid over it")] = None,
    oof_format: Annotated[str, typer.Option(help="auto | npz | nifti for the out-of-fold probability maps")] = "auto",
    device: Annotated[str, typer.Option(help="Device for out-of-fold prediction")] = "auto",
    set_: Sets = None,
) -> None:
    """K-fold cross-validation: out-of-fold probabilities and metrics, and one bundle of the K fold models."""
    try:
        sets = [*(set_ or []), *([f"train.budget_minutes={max_minutes_per_fold}"] if max_minutes_per_fold else [])]
        cfg = _load_cfg(config, data, sets, epochs, limit_cases)
        from medseg.engine.cv import cross_validate

        result = cross_validate(cfg, out, folds, resume=resume, oof_format=oof_format, device=device)
    except MedsegError as e:
        _fail(e)
        return
    table = Table(title=f"{len(result.fold_dice)}-fold cross-validation, out-of-fold, {len(result.oof_files)} cases")
    for col in ("label", "Dice", "IoU", "HD95", "surface Dice"):
        table.add_column(col)
    for label, s in result.summary.items():
        table.add_row(label, f"{s['dice_mean']:.4f} ± {s['dice_sd']:.4f}", f"{s['iou_mean']:.4f} ± {s['iou_sd']:.4f}",
                      f"{s['hd95_mean']:.2f} ± {s['hd95_sd']:.2f}", f"{s['surface_dice_mean']:.4f} ± {s['surface_dice_sd']:.4f}")
    Console().print(table)
    c = result.calibration
    console.print(
        f"temperature {c.temperature:.3f}: expected calibration error {c.ece_before:.4f} -> {c.ece_after:.4f}\n"
        f"out-of-fold maps in {out / 'oof'}, per-case metrics in {out / 'oof_metrics.csv'}; bundle at {result.bundle}",
        highlight=False,
    )


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="Experiment YAML with a tune.space")],
    trials: Annotated[int, typer.Option(help="Finished trials the study should hold (a budget over all workers)")] = 20,
    storage: Annotated[str | None, typer.Option(help="SQLAlchemy URL, e.g. postgresql://user@host/db (default sqlite OUT/study.db)")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: the config's name)")] = None,
    data: DataOpt = None,
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("outputs/tune"),
    epochs: EpochsOpt = None,
    limit_cases: LimitCasesOpt = None,
    max_minutes_per_trial: Annotated[float | None, typer.Option(help="Wall-clock budget per trial (train.budget_minutes)")] = None,
    set_: Sets = None,
) -> None:
    """Optuna search over tune.space with pruning; run it in several processes on one --storage to parallelise."""
    try:
        sets = [*(set_ or []), *([f"train.budget_minutes={max_minutes_per_trial}"] if max_minutes_per_trial else [])]
        cfg = _load_cfg(config, data, sets, epochs, limit_cases)
        from medseg.engine.tune import tune as run_tune

        result = run_tune(cfg, out, trials, storage=storage, study_name=study)
    except MedsegError as e:
        _fail(e)
        return
    params = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
    console.print(
        f"study {result.study_name!r}: {result.complete} complete, {result.pruned} pruned, {result.failed} failed\n"
        f"best val Dice {result.best_value:.4f} with {params}\nbest config: {result.best_config}; "
        f"plots: {', '.join(p.name for p in result.plots)}",
        highlight=False,
    )


@app.command()
def doctor(
    config: Annotated[Path, typer.Argument(help="Experiment YAML")],
    data: DataOpt = None,
    out: Annotated[Path, typer.Option(help="Output folder (lr_find.png)")] = Path("outputs/doctor"),
    limit_cases: LimitCasesOpt = None,
    overfit_steps: Annotated[int, typer.Option(help="Steps of the tiny-subset overfit test")] = 60,
    lr_find: Annotated[bool, typer.Option(help="Run the LR range test")] = True,
    lr_find_steps: Annotated[int, typer.Option(help="Steps of the LR range test")] = 60,
    set_: Sets = None,
) -> None:
    """Check data, initial loss, a tiny overfit and the learning rate before a long run; exit 1 on errors."""
    try:
        cfg = _load_cfg(config, data, set_, None, limit_cases)
        from medseg.engine.doctor import run_doctor

        report = run_doctor(cfg, out, overfit_steps=overfit_steps, lr_find=lr_find, lr_find_steps=lr_find_steps)
    except MedsegError as e:
        _fail(e)
        return
    marks = {"ok": "[green]ok[/green]     ", "info": "[blue]info[/blue]   ", "warning": "[yellow]warning[/yellow]",
             "error": "[red]error[/red]  "}
    for c in report.checks:
        console.print(f"{marks[c.severity]} {c.code}: ", end="", highlight=False)
        console.print(c.message, highlight=False, markup=False, soft_wrap=True)
    if report.suggested_lr is not None:
        console.print(f"suggested learning rate {report.suggested_lr:.2g} (plot {report.lr_plot})", highlight=False)
    if report.has_errors:
        raise typer.Exit(1)


@app.command()
def robustness(
    bundle: Annotated[Path, typer.Argument(help="Model bundle")],
    data: Annotated[Path | None, typer.Option(help="Dataset folder (default: the one the bundle was trained on)")] = None,
    split: Annotated[str, typer.Option(help="val | train | all")] = "val",
    limit_cases: Annotated[int | None, typer.Option(help="Score only the first N cases of the split")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: BUNDLE/../robustness)")] = None,
    eps: Annotated[list[float] | None, typer.Option(help="FGSM/PGD L-inf radius on the [0, 1] input, repeatable "
                                                       "(default 1, 2, 4, 8 /255); --no-attacks skips them")] = None,
    attacks: Annotated[bool, typer.Option(help="Run FGSM and PGD")] = True,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Dice under graded corruptions and FGSM/PGD attacks; prints a table, writes robustness.png/.json/.csv."""
    from medseg.bundle import load_bundle
    from medseg.engine.evaluate import bundle_cases
    from medseg.engine.robustness import ATTACK_EPS, plot_rows, robustness_rows, write_rows
    from medseg.inference import Predictor

    try:
        loaded = load_bundle(bundle)
        cases = bundle_cases(loaded.config, loaded.path, data, split)[:limit_cases]
        eps_levels = (tuple(eps) if eps else ATTACK_EPS) if attacks else ()
        rows = robustness_rows(Predictor.from_bundle(loaded, device=device), cases, loaded.config,
                               eps_levels=eps_levels)
    except MedsegError as e:
        _fail(e)
        return
    table = Table(title=f"{Path(bundle).name}: {split} split, {rows[0]['n_cases']} cases")
    for col in ("corruption", "severity", "param", "dice", "Δ vs clean"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["corruption"], str(r["severity"]), f"{r['param']:.4g}", f"{r['dice']:.4f}",
                      f"{r['dice'] - rows[0]['dice']:+.4f}")
    Console().print(table)
    out = out or Path(bundle).parent / "robustness"
    json_path, csv_path = write_rows(rows, out)
    plot = plot_rows(rows, out / "robustness.png", title=f"{Path(bundle).name}: Dice under corruption")
    console.print(f"written {plot}, {json_path}, {csv_path}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
