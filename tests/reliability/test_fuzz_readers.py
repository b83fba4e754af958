"""Every reader on damaged and hostile input: a medseg error with a one-line message naming the file, or a
valid scan, within a time bound, in a memory-capped process. Never a crash, a hang or unbounded memory.

Inputs: truncated / bit-flipped / byte-overwritten copies of real files from the shared datasets (PNG, JPEG,
TIFF, NIfTI, NRRD, MHA, DICOM, a DICOM series as folder and zip), crafted absurd headers and hostile zips
(robust_harness.absurd_header_cases / zip_cases). Readers run in robust_harness.ReaderWorker.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import robust_harness as h
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from robust_harness import FUZZ_EXAMPLES, FUZZ_RANDOM

import medseg.io as mio
from medseg.io import archive, checks

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # a subprocess round trip on a shared 2-core machine; the worker enforces the hang bound
    derandomize=not FUZZ_RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
_counter = itertools.count()


def _assert_acceptable(outcome: h.Outcome, what: str) -> None:
    assert not outcome.failed, f"{what}: {outcome}"


# ------------------------------------------------------------------------------------------- the harness


def test_harness_reports_segfaults_hangs_and_memory_blowups(tmp_path: Path) -> None:
    """The worker must really catch what the fuzz tests claim never happens (else they prove nothing)."""
    with h.ReaderWorker(timeout_s=3) as w:
        hang = w.run("_selftest_sleep", tmp_path / "x", seconds=600)
        assert hang.verdict == "hang" and w.restarts == 1
    with h.ReaderWorker(memory_mb=2048) as w:
        crash = w.run("_selftest_segfault", tmp_path / "x")
        assert crash.verdict == "crash" and "SIGSEGV" in crash.message
        capped = w.run("_selftest_allocate", tmp_path / "x", mb=3072)  # beyond RLIMIT_AS: MemoryError
        assert capped.verdict == "oom" and "MemoryError" in capped.message
        big = w.run("_selftest_allocate", tmp_path / "x", mb=h.MEMORY_FLAG_MB + 200)  # allowed, but too much
        assert big.verdict == "oom" and big.peak_mb > h.MEMORY_FLAG_MB, big
        fine = w.run("_selftest_allocate", tmp_path / "x", mb=16)
        assert fine.verdict == "ok" and fine.peak_mb < 100, fine
        assert w.restarts == 1  # after the segfault; a MemoryError leaves the worker alive


def test_error_messages_must_name_the_file_on_one_line(tmp_path: Path) -> None:
    p = tmp_path / "scan.png"
    assert h.error_message_problem("scan.png: corrupt", p) is None
    assert h.error_message_problem("corrupt image", p) == "message does not name 'scan.png'"
    assert h.error_message_problem("scan.png: a\nb", p) == "message spans several lines"
    assert h.error_message_problem(f"{p}: corrupt", p) == "message shows the file's directory"


def test_seeds_are_valid_scans(worker: h.ReaderWorker, seeds: h.Seeds) -> None:
    """Mutating a file that does not read in the first place would test nothing."""
    for key in h.FUZZ_TARGETS:
        outcome = worker.run("read_scan", seeds[key])
        assert outcome.verdict == "ok", outcome
    series = worker.run("read_scan", seeds["dicom_series"])
    assert series.verdict == "ok" and series.message.startswith("(6, 96, 96)"), series


# ------------------------------------------------------------------------------------------- crafted input


def test_absurd_headers_end_in_clear_errors_or_valid_scans(worker: h.ReaderWorker, seeds: h.Seeds,
                                                           scratch: Path) -> None:
    cases = h.absurd_header_cases(seeds, scratch / "absurd")
    assert {c.fmt for c in cases} >= {"png", "jpg", "tiff", "nifti", "nrrd", "mha", "dicom"}
    results = {c.name: o for c, o in h.run_cases(worker, cases)}
    problems = [p for c in cases if (p := h.expectation_problem(c, results[c.name]))]
    assert not problems, "\n".join(problems)
    # Decompression bombs are refused from the header, by the documented caps, before any decoding.
    assert "cap of 1,000,000,000" in results["nii_huge_dims.nii.gz"].message
    assert "cap of 1,000,000,000" in results["dcm_huge_rows_cols.dcm"].message
    assert "truncated NIfTI" in results["nii_big_dims_no_data.nii.gz"].message
    assert "4D image" in results["nii_4d.nii.gz"].message and "5D image" in results["nii_5d.nii.gz"].message
    assert "every voxel is NaN" in results["tiff_all_nan.tif"].message
    assert "non-finite value in the NIfTI header" in results["nii_sform_inf_offset_hang.nii.gz"].message
    assert "claims 3,204,687,875 bytes" in results["dcm_trailing_element_claims_3gb.dcm"].message
    assert "(0002,0016) has no valid VR" in results["dcm_meta_vr_garbled.dcm"].message
    assert "unknown transfer syntax" in results["dcm_unknown_transfer_syntax.dcm"].message or \
        "not a readable DICOM" in results["dcm_unknown_transfer_syntax.dcm"].message
    # NaN/inf voxels are filled (valid scan) with a warning that says so.
    nan_vol = results["vol_nan_inf.nrrd"]
    assert nan_vol.verdict == "ok" and any("non-finite voxels" in w for w in nan_vol.warnings), nan_vol


def test_hostile_zips_are_refused_or_read(worker: h.ReaderWorker, seeds: h.Seeds, scratch: Path) -> None:
    cases = h.zip_cases(seeds, scratch / "zips")
    results = {c.name: o for c, o in h.run_cases(worker, cases)}
    problems = [p for c in cases if (p := h.expectation_problem(c, results[c.name]))]
    assert not problems, "\n".join(problems)
    assert not list(Path("/tmp").glob("evil.dcm")) and not (scratch / "evil.dcm").exists()
    assert "zip slip" in results["slip_0.zip"].message and "absolute path" in results["slip_2.zip"].message
    assert "cap of 200:1" in results["bomb_ratio.zip"].message
    assert f"cap of {archive.MAX_TOTAL_BYTES:,} bytes" in results["bomb_many_small.zip"].message
    assert f"cap of {archive.MAX_MEMBERS:,}" in results["over_member_cap.zip"].message
    assert "nested archive(s) are not opened (inner.zip)" in results["nested.zip"].message
    assert "symlink" in results["symlink.zip"].message
    for name in ("name_too_long.zip", "path_too_deep.zip", "file_dir_conflict.zip"):
        assert results[name].verdict == "error" and "cannot extract member" in results[name].message, name
    assert "evil\\x0aname.zip" in results["newline_name.zip"].message  # escaped, still one line
    # 3000 members are handled, within the hang bound, with a message saying what was found.
    assert "3000 file(s) checked" in results["thousands_tiny.zip"].message
    truncated = results["series_truncated_slice.zip"]  # one slice unreadable: an error, not a shifted volume
    assert truncated.verdict == "error" and "1 .dcm file(s) could not be parsed" in truncated.message, truncated


def test_bomb_limits_are_explicit_medseg_io_constants() -> None:
    """The caps are public constants, documented in medseg.io, and the defaults every reader uses."""
    assert mio.MAX_VOXELS == checks.MAX_VOXELS == 1_000_000_000
    assert mio.MAX_IMAGE_PIXELS == checks.MAX_IMAGE_PIXELS
    limits = mio.ArchiveLimits()
    assert (limits.max_members, limits.max_total_bytes, limits.max_ratio) == (
        mio.MAX_MEMBERS, mio.MAX_TOTAL_BYTES, mio.MAX_COMPRESSION_RATIO)
    for name in ("MAX_VOXELS", "MAX_IMAGE_PIXELS", "MAX_MEMBERS", "MAX_TOTAL_BYTES", "MAX_COMPRESSION_RATIO"):
        assert name in mio.__doc__, f"{name} is not documented in medseg.io's docstring"


def test_fifo_is_refused_instead_of_blocking(worker: h.ReaderWorker, tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    outcome = worker.run("read_scan", fifo)
    assert outcome.verdict == "error" and "not a regular file" in outcome.message, outcome


# ------------------------------------------------------------------------------------------- mutations


@pytest.mark.parametrize("key", list(h.FUZZ_TARGETS))
@FUZZ
@given(data=st.data())
def test_mutated_files(key: str, data: st.DataObject, worker: h.ReaderWorker, seeds: h.Seeds,
                       scratch: Path) -> None:
    mutation = data.draw(h.mutation_strategy(key), label="mutation")
    reader = data.draw(st.sampled_from(h.FUZZ_TARGETS[key][1]), label="reader")
    path = h.write_mutant(seeds, key, mutation, scratch / "mutants", str(next(_counter)))
    try:
        _assert_acceptable(worker.run(reader, path), f"{reader}({key} {mutation})")
    finally:
        path.unlink(missing_ok=True)


@FUZZ
@given(mutation=h.mutation_strategy("dicom_raw"), slice_index=st.integers(0, 5), as_zip=st.booleans())
def test_dicom_series_with_one_damaged_slice(mutation: tuple, slice_index: int, as_zip: bool,
                                             worker: h.ReaderWorker, seeds: h.Seeds, scratch: Path) -> None:
    path = h.write_series_mutant(seeds, mutation, slice_index, scratch / "series", str(next(_counter)), as_zip)
    outcome = worker.run("read_scan", path)
    _assert_acceptable(outcome, f"series slice {slice_index} {mutation} zip={as_zip}")
    if outcome.verdict == "ok":  # a series read with a slice left out must say so
        slices = int(outcome.message.split(",")[0].strip("("))
        assert slices == 6 or outcome.warnings, outcome


@FUZZ
@given(mutation=h.mutation_strategy("zip"))
def test_mutated_zip_archives(mutation: tuple, worker: h.ReaderWorker, seeds: h.Seeds, scratch: Path) -> None:
    path = h.write_zip_mutant(seeds, mutation, scratch / "zipmut", str(next(_counter)))
    for reader in ("read_scan", "extract_zip"):
        _assert_acceptable(worker.run(reader, path), f"{reader} zip {mutation}")


# ------------------------------------------------------------------------------------------- atheris


def test_coverage_guided_fuzzing_with_atheris(seeds: h.Seeds, tmp_path: Path) -> None:
    """libFuzzer-driven mutations of the seed files (atheris, when installed): no crash, hang or OOM finding.
    Longer sessions: tests/reliability/atheris_readers.py CORPUS -max_total_time=600."""
    import subprocess
    import sys

    pytest.importorskip("atheris", reason="atheris is not installed (dev pin: atheris==3.0.0)")
    import atheris_readers

    corpus = atheris_readers.write_corpus(
        {".png": seeds["png"], ".jpg": seeds["jpg"], ".tif": seeds["tiff"], ".nii.gz": seeds["nifti"],
         ".nrrd": seeds["nrrd"], ".dcm": seeds["dicom_raw"],
         ".zip": h.zip_folder(seeds["dicom_series"], tmp_path / "series.zip")},
        tmp_path / "corpus",
    )
    runs = max(200, FUZZ_EXAMPLES * 12)
    proc = subprocess.run(
        [sys.executable, str(Path(atheris_readers.__file__)), str(corpus), f"-runs={runs}", "-max_len=200000",
         "-timeout=60", "-rss_limit_mb=3072", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    findings = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not findings, (findings, proc.stderr[-4000:])
    # libFuzzer counts the seed inputs it replays after the last mutation too: "Done 301 runs" for -runs=300.
    done = re.search(r"Done (\d+) runs", proc.stderr)
    assert done and int(done.group(1)) >= runs, proc.stderr[-2000:]


def test_hostile_headers_never_read_outside_the_input(worker: h.ReaderWorker, seeds: h.Seeds, scratch: Path) -> None:
    """Issue 15: data-file references in every header syntax and length, header tricks and voxel-count bombs
    in every format, as uploads and as local files: each a one-line error naming the reason, no leak."""
    cases = h.hostile_header_cases(seeds, scratch / "hostile")
    assert {c.fmt for c in cases} >= {"png", "jpg", "tiff", "nifti", "nrrd", "mha", "dicom", "zip"}
    results = h.run_cases(worker, cases)
    problems = [p for c, o in results if (p := h.expectation_problem(c, o))]
    assert not problems, f"{len(problems)} of {len(cases)}:\n" + "\n".join(problems[:20])
    assert sum(o.verdict == "leak" for _, o in results) == 0
