"""Robustness of medseg against bad input and killed processes; prints tables, asserts nothing.

    .venv/bin/python benchmarks/robustness.py [--mutations 200] [--seed 0] [--write-kills 6] [--no-train]
                                              [--reference]

1. Readers: every seed file (real data from ../shared/datasets: PNG, JPEG, TIFF, NIfTI, NRRD, MHA, DICOM) gets
   ``--mutations`` random damages (truncation, bit flips anywhere and in the header, byte overwrites with
   boundary values, PNG chunk edits with fixed CRCs, NIfTI header edits); a 6-slice DICOM series gets one slice
   damaged (as a folder and as a zip); the zipped series gets its bytes damaged; plus every crafted case
   (absurd headers, zip bombs, zip slip, thousands of members, nested zips) and the hostile-header family
   (MetaImage/NRRD data-file references to a secret outside the input in every syntax, header length and line
   end, as uploads and as local files; header tricks; voxel-count bombs in every format). Each input is read in
   a memory-capped worker process (RLIMIT_AS) with a hang bound (tests/reliability/robust_harness.py).
   "errors with message" are medseg errors with a one-line message naming the file; "bad messages" are medseg
   errors without that; crashes (any other exception, or the process died), hangs, out-of-memory and reads of
   files outside the input ("read outside") must be 0.
2. HTML injection: hostile label names and colours (script/style/event-handler/attribute-breakout payloads,
   Markdown links and images, LaTeX, Streamlit colour directives) through every place the app builds HTML or
   Markdown from a bundle or a service (legend swatch, legend colour, Markdown text), and as bundle
   labels.json colours (must be refused when the bundle loads).
3. Interrupted writes: processes writing masks and bundles are SIGKILLed at random moments and at exact
   points (temp file complete before the rename; between a bundle's two renames); afterwards the output must
   load and be one complete version.
4. Training: ``medseg train`` (tiny config) is SIGKILLed mid-epoch 1, while the next checkpoint is written,
   right after the one after and while the bundle is written, resumed with ``--resume`` each time, and finishes;
   ``--reference`` also runs it uninterrupted and compares val Dice per epoch.

Environment: MEDSEG_FUZZ_CASE_TIMEOUT (hang bound, s), MEDSEG_FUZZ_MEMORY_MB (address space per worker).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))

import robust_harness as h  # noqa: E402

DATASETS = Path(__import__("os").environ.get("MEDSEG_DATASETS", REPO.parent / "shared" / "datasets"))
FORMAT_ROWS = ("png", "jpg", "tiff", "nifti", "nrrd", "mha", "dicom", "zip")


def fuzz_readers(root: Path, mutations: int, seed: int, console: Console) -> tuple[dict, list[str]]:
    rng = random.Random(seed)
    seeds = h.make_seeds(DATASETS, root / "seeds")
    tally: dict[str, Counter] = defaultdict(Counter)
    slowest: dict[str, float] = defaultdict(float)
    failures: list[str] = []

    def record(fmt: str, what: str, outcome: h.Outcome) -> None:
        tally[fmt]["tried"] += 1
        tally[fmt][outcome.verdict] += 1
        slowest[fmt] = max(slowest[fmt], outcome.seconds)
        if outcome.failed:
            failures.append(f"{what}: {outcome}")

    mutants = root / "mutants"
    with h.ReaderWorker() as worker:
        for key, (_suffix, readers) in h.FUZZ_TARGETS.items():
            for i in range(mutations):
                mutation = h.random_mutation(rng, key)
                path = h.write_mutant(seeds, key, mutation, mutants, str(i))
                reader = readers[i % len(readers)]
                record(h.FORMAT_OF[key], f"{reader}({key} {mutation})", worker.run(reader, path))
                path.unlink()
            console.print(f"  {key}: {mutations} mutants", highlight=False)
        for i in range(mutations):
            mutation = h.random_mutation(rng, "dicom_raw")
            as_zip = i % 2 == 1
            path = h.write_series_mutant(seeds, mutation, rng.randrange(6), mutants, str(i), as_zip)
            record("zip" if as_zip else "dicom", f"series {mutation} zip={as_zip}", worker.run("read_scan", path))
            mutation = h.random_mutation(rng, "zip")
            path = h.write_zip_mutant(seeds, mutation, mutants, str(i))
            record("zip", f"zip {mutation}", worker.run(("read_scan", "extract_zip")[i % 2], path))
        console.print(f"  DICOM series and zips: {2 * mutations} mutants", highlight=False)
        crafted = (h.absurd_header_cases(seeds, root / "absurd") + h.zip_cases(seeds, root / "zips")
                   + h.hostile_header_cases(seeds, root / "hostile"))
        for case, outcome in h.run_cases(worker, crafted):
            record(case.fmt, f"crafted {case.name}", outcome)
            problem = h.expectation_problem(case, outcome)
            if problem and not outcome.failed:
                failures.append(f"crafted {case.name}: unexpected answer: {problem}")
        console.print(f"  crafted: {len(crafted)} cases; worker restarts: {worker.restarts}", highlight=False)
    return {"tally": tally, "slowest": slowest}, failures


HTML_PAYLOADS = [
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "<style>.stAlert{display:none}</style>",
    '<input type="password" placeholder="Sign in">', '" onmouseover="alert(1)', "' onmouseover='alert(1)",
    '"><svg onload=alert(1)>', "</div><div style=\"position:fixed;inset:0\">", "<iframe src=//evil>",
    "&lt;script&gt;", "javascript:alert(1)", "[sign in](http://evil.example/login)",
    "![x](http://evil.example/pixel.png)", "<http://evil.example>", "http://evil.example www.evil.example",
    "$\\href{http://evil}{x}$", ":red[fake alert] :material/lock:", "# Heading", "> quote", "1. list",
    "`code` **bold** ~~strike~~ | a | b |", "\\[escaped\\](x)", "line\nbreak\r\n<b>bold</b>",
    "\u202e<b>rtl</b>", "nucleus",
]
COLOUR_PAYLOADS = ["red;position:fixed", "#fff;background:url(//evil)", "url(javascript:alert(1))", "#12345g",
                   "#ff00001", "expression(alert(1))", "red", "", "#abc\n", "rgb(1,2,3)"]


def html_injection(root: Path) -> list[tuple[str, int, int, int]]:
    """(surface, hostile inputs, made inert or refused, injections) per place HTML or Markdown is built."""
    import html.parser
    import json

    import torch
    from markdown_it import MarkdownIt

    sys.path.insert(0, str(REPO))
    from app.display import legend_colors
    from app.escape import markdown_text
    from app.viewer import SWATCH, swatch_html
    from medseg.bundle import load_bundle, save_bundle
    from medseg.config import load_config
    from medseg.errors import BundleError

    class Tags(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[tuple[str, dict]] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.tags.append((tag, dict(attrs)))

    rows = []
    payloads = HTML_PAYLOADS + [a + b for a in HTML_PAYLOADS[:8] for b in HTML_PAYLOADS[8:16]]
    injected = 0
    for name in payloads:
        parser = Tags()
        parser.feed(swatch_html(name, "#e6194b"))
        expected_style = SWATCH.split('style="')[1].split('"')[0].format(color="#e6194b")
        if parser.tags != [("div", {"title": name, "style": expected_style})]:
            injected += 1
    rows.append(("legend swatch (st.html): label names", len(payloads), len(payloads) - injected, injected))

    injected = 0
    for colour in COLOUR_PAYLOADS:
        shown = legend_colors({0: {"name": "bg"}, 1: {"name": "x", "color": colour}})[1]
        injected += not (len(shown) == 7 and shown.startswith("#") and all(c in "0123456789abcdef" for c in shown[1:]))
    rows.append(("legend colour (CSS in st.html): label colours", len(COLOUR_PAYLOADS),
                 len(COLOUR_PAYLOADS) - injected, injected))

    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    injected = 0
    for text in payloads:
        escaped = markdown_text(text)
        parser = Tags()
        parser.feed(md.render(escaped))
        tags = {tag for tag, _ in parser.tags}
        unescaped_extension = any(  # Streamlit's own syntax, not CommonMark: $math$, :icon: and :colour[...]
            ch in "$:" and (i == 0 or escaped[i - 1] != "\\") and (ch == "$" or escaped[i + 1:i + 2].strip())
            for i, ch in enumerate(escaped))
        injected += bool(tags - {"p", "em"}) or unescaped_extension or "\n" in escaped
    rows.append(("Markdown text (captions, errors, widget labels)", len(payloads), len(payloads) - injected,
                 injected))

    cfg = load_config(None, ["name=tiny", "data.labels={0: bg, 1: thing}"])
    path = save_bundle(root / "html_bundle", cfg, {"model": {"w": torch.zeros(2, 3)}}, {}, "# tiny")
    labels = json.loads((path / "labels.json").read_text())
    refused = 0
    hex_like = [c for c in COLOUR_PAYLOADS if c not in ("red",)]  # a bare name is not #rrggbb either
    for colour in hex_like + ["red"]:
        labels["1"]["color"] = colour
        (path / "labels.json").write_text(json.dumps(labels))
        try:
            load_bundle(path)
        except BundleError:
            refused += 1
    total = len(hex_like) + 1
    rows.append(("bundle labels.json colours (refused at load)", total, refused, total - refused))
    return rows


def interrupted_writes(root: Path, kills: int, seed: int) -> list[tuple[str, int, int, int, list[str]]]:
    """(scenario, runs killed, restarts that found a complete output, data lost, problems) per scenario."""
    sys.path.insert(0, str(REPO / "tests" / "reliability"))
    import crash_child
    import numpy as np

    from medseg.bundle import load_bundle
    from medseg.errors import BundleError
    from medseg.io import read_scan

    rng = random.Random(seed)
    rows = []
    masks = crash_child.versions_mask((24, 256, 256))

    def mask_ok(out: Path, done: bool) -> str | None:
        target = out / "mask.nii.gz"
        if not target.exists():
            return "completed mask missing" if done else None
        arr = read_scan(target).array
        return None if any(np.array_equal(arr, m) for m in masks) else "mask is neither version"

    def bundle_ok(out: Path, done: bool) -> str | None:
        try:
            b = load_bundle(out / "bundle")
            w = b.load_members()["model"]
            values = {float(w["w"].min()), float(w["w"].max()), float(w["b"].min()), float(w["b"].max())}
            return None if len(values) == 1 and b.preprocessing == {"version": int(values.pop()) - 1} else "mixed"
        except BundleError as e:
            return f"bundle does not load: {e}" if done else None

    for kind, check, hook in (("mask", mask_ok, "before_replace"), ("bundle", bundle_ok, "between_renames")):
        out = root / f"writes_{kind}"
        out.mkdir(parents=True)
        killed, intact, problems, done = 0, 0, [], False
        for i in range(kills + 1):
            exact = i == kills  # the last kill lands at the exact hook point
            child = h.WriterChild(kind, out, hook if exact and done else "none")
            if exact and done:
                child.wait_for("HOOK")
            else:
                child.wait_for("WRITING")
                time.sleep(rng.uniform(0, 1.5))
            child.kill()
            killed += 1
            done |= child.done >= 0
            problem = check(out, done)
            if problem:
                problems.append(problem)
            elif done:
                intact += 1
        rows.append((f"{kind} writes (kills at random moments + {hook})", killed, intact, len(problems), problems))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=200, help="random mutants per seed file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-kills", type=int, default=6, help="random kills per write scenario")
    parser.add_argument("--no-train", action="store_true", help="skip the training kill/resume campaign")
    parser.add_argument("--reference", action="store_true", help="also train uninterrupted and compare val Dice")
    args = parser.parse_args()
    console = Console(width=150)
    root = Path(tempfile.mkdtemp(prefix="medseg-robustness-"))
    start = time.time()

    console.print(f"[b]1. readers[/b] ({args.mutations} mutants per seed, seed {args.seed})", highlight=False)
    fuzz, failures = fuzz_readers(root, args.mutations, args.seed, console)
    console.print("[b]2. HTML injection[/b]", highlight=False)
    html_rows = html_injection(root)
    console.print("[b]3. interrupted writes[/b]", highlight=False)
    writes = interrupted_writes(root, args.write_kills, args.seed)
    campaign = None
    dice = None
    if not args.no_train:
        console.print("[b]4. training killed and resumed[/b] (minutes)", highlight=False)
        campaign = h.crash_resume_campaign(root / "train", root / "train_tmp", seed=args.seed)
        if args.reference:
            ref = h.run_train(root / "reference", root / "reference_tmp")
            if ref.returncode == 0:
                dice = (h.val_dice_by_epoch(root / "reference"), h.val_dice_by_epoch(root / "train"))

    table = Table(title="Readers on damaged and hostile input")
    for col in ("format", "inputs tried", "valid scans", "errors with message", "bad messages", "crashes",
                "hangs", "out of memory", "read outside", "slowest (s)"):
        table.add_column(col, justify="left" if col == "format" else "right")
    total: Counter = Counter()
    for fmt in FORMAT_ROWS:
        t = fuzz["tally"].get(fmt, Counter())
        total.update(t)
        table.add_row(fmt, str(t["tried"]), str(t["ok"]), str(t["error"]), str(t["bad_error"]), str(t["crash"]),
                      str(t["hang"]), str(t["oom"]), str(t["leak"]), f"{fuzz['slowest'].get(fmt, 0):.2f}")
    table.add_row("[b]all[/b]", str(total["tried"]), str(total["ok"]), str(total["error"]), str(total["bad_error"]),
                  str(total["crash"]), str(total["hang"]), str(total["oom"]), str(total["leak"]),
                  f"{max(fuzz['slowest'].values(), default=0):.2f}")
    console.print(table)

    html_table = Table(title="HTML and Markdown injection (bundle / service values)")
    for col in ("surface", "hostile inputs", "inert or refused", "injections"):
        html_table.add_column(col, justify="left" if col == "surface" else "right")
    for surface, tried, inert, injections in html_rows:
        html_table.add_row(surface, str(tried), str(inert), str(injections))
    console.print(html_table)

    kills = Table(title="Processes killed (SIGKILL) and resumed")
    for col in ("scenario", "runs killed", "resumed / reloaded", "data lost"):
        kills.add_column(col, justify="left" if col == "scenario" else "right")
    for name, killed, intact, lost, _ in writes:
        kills.add_row(name, str(killed), str(intact), str(lost))
    if campaign is not None:
        kills.add_row("medseg train (mid-epoch, checkpoint write, after checkpoint, bundle write)",
                      str(len(campaign.kills)), str(campaign.resumes), str(len(campaign.data_lost)))
    console.print(kills)
    if campaign is not None:
        for k in campaign.kills:
            console.print(f"  killed {k}", highlight=False)
        console.print(f"  {campaign.log[-1][:300]}", highlight=False)
    if dice is not None:
        ref_d, run_d = dice
        console.print("val Dice per epoch, uninterrupted vs killed+resumed: " + ", ".join(
            f"{e}: {ref_d[e]:.4f} / {run_d.get(e, float('nan')):.4f}" for e in sorted(ref_d)), highlight=False)
    for f in failures[:30]:
        console.print(f"[red]failure[/red] {f}", highlight=False)
    for _, _, _, _, problems in writes:
        for p in problems:
            console.print(f"[red]data lost[/red] {p}", highlight=False)
    if campaign is not None:
        for p in campaign.data_lost:
            console.print(f"[red]data lost[/red] {p}", highlight=False)
    lost = any(w[3] for w in writes) or (campaign is not None and campaign.data_lost)
    injected = sum(r[3] for r in html_rows)
    if injected:
        console.print(f"[red]failure[/red] {injected} HTML/Markdown injection(s)", highlight=False)
    if failures or lost or injected:
        console.print(f"{time.time() - start:.0f} s; inputs kept for inspection under {root}", highlight=False)
    else:
        shutil.rmtree(root, ignore_errors=True)
        console.print(f"{time.time() - start:.0f} s", highlight=False)


if __name__ == "__main__":
    main()
