"""No patient identifiers in logs, messages, file names or non-DICOM outputs; none in an anonymized DICOM SEG.

A copy of the real CT series gets unique values in PatientName, PatientID, PatientBirthDate and other
identifying attributes; ``medseg predict`` runs on it (folder, zip, zip with patient-named folders, a damaged
copy, a mixed-series copy) in a subprocess, and every byte it leaves behind is searched for those values:
stdout, stderr, the names and contents of every output file, and the temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
import pytest
import robust_harness as h
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from medseg.cli import app

IDENTIFIERS, find_identifiers, scan_tree = h.IDENTIFIERS, h.find_identifiers, h.scan_tree

@pytest.fixture(scope="module")
def identified_inputs(seeds: h.Seeds, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("in")
    series = h.write_identified_series(seeds, folder / "series", IDENTIFIERS)
    h.zip_folder(series, folder / "series.zip")
    # A zip whose folders are named after the patient (PACS exports do this): messages keep base names only.
    named = folder / "named.zip"
    with zipfile.ZipFile(named, "w") as zf:
        for i, f in enumerate(sorted(series.iterdir())):
            data = f.read_bytes()
            zf.writestr(f"{IDENTIFIERS['PatientID']}/Zqxwv_Privacyname/{f.name}", data[:1500] if i == 2 else data)
    damaged = folder / "damaged"
    shutil.copytree(series, damaged)
    (damaged / "IM0004.dcm").write_bytes((damaged / "IM0004.dcm").read_bytes()[:3000])
    mixed = folder / "mixed"
    shutil.copytree(series, mixed)
    ds = pydicom.dcmread(mixed / "IM0006.dcm")
    # SeriesDescription is shown on purpose (it is how users pick a series); it is free text that sites are
    # expected not to fill with names (PS3.15 removes it), so it holds none here.
    ds.SeriesInstanceUID, ds.SeriesDescription = generate_uid(), "scout"
    ds.save_as(mixed / "IM0006.dcm")
    evil = folder / "slip.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr(f"../{IDENTIFIERS['PatientID']}/IM0001.dcm", (series / "IM0001.dcm").read_bytes())
    return folder


def test_cli_predict_leaks_no_identifiers(random_bundle: Path, identified_inputs: Path, tmp_path: Path) -> None:
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONWARNINGS": "always"}
    proc = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "predict", str(random_bundle), str(identified_inputs), "--out", str(out),
         "--device", "cpu", "--probabilities", "--uncertainty", "--dicom-seg", "--anonymize", "--allow-missing-slices"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    flat = " ".join(output.split())
    assert "failed slip.zip" in flat and "failed mixed" in flat, output  # these fail by design:
    assert "failed damaged: damaged: IM0004.dcm is truncated" in flat, output  # pixel data cut short
    for stem in ("series_dir", "series_zip", "named"):
        assert (out / f"{stem}_mask.nii.gz").is_file(), (stem, output.split("inputs segmented")[-1])
        assert (out / f"{stem}_seg.dcm").is_file(), stem
    assert "named.zip: 1 .dcm file(s) could not be parsed" in flat  # reported, by base name only
    assert not find_identifiers(output), f"identifiers in stdout/stderr: {find_identifiers(output)}\n{output}"
    hits = scan_tree(out)  # anonymized SEGs included
    assert not hits, hits
    assert not list(tmp.iterdir()), f"temporary files left behind: {list(tmp.iterdir())}"


def test_non_anonymized_seg_carries_identifiers_so_the_search_is_real(
    random_bundle: Path, identified_inputs: Path, tmp_path: Path
) -> None:
    """Without --anonymize the SEG must copy the patient module (a valid SEG), which proves the identifiers
    flow through the pipeline and the search finds them; every other output stays clean."""
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(random_bundle), str(identified_inputs / "series"), "--out",
                                   str(out), "--device", "cpu", "--dicom-seg", "--probabilities"])
    assert res.exit_code == 0, res.output
    seg = out / "series_seg.dcm"
    assert "Zqxwv^Privacyname" in str(pydicom.dcmread(seg).PatientName)
    assert find_identifiers(seg.read_bytes())
    assert not scan_tree(out, skip_dicom=True)
    assert not find_identifiers(res.output)


def test_anonymized_seg_references_the_deidentified_source_consistently(
    random_bundle: Path, identified_inputs: Path, tmp_path: Path
) -> None:
    from medseg.inference.deidentify import deidentify_dataset, ensure_uids

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(random_bundle), str(identified_inputs / "series"), "--out",
                                   str(out), "--device", "cpu", "--dicom-seg", "--anonymize"])
    assert res.exit_code == 0, res.output
    seg = pydicom.dcmread(out / "series_seg.dcm")
    assert not find_identifiers((out / "series_seg.dcm").read_bytes())
    assert seg.PatientIdentityRemoved == "YES"
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((identified_inputs / "series").iterdir())]
    deid = [deidentify_dataset(ds, "") for ds in ensure_uids(sources)]
    deid_sops = {str(ds.SOPInstanceUID) for ds in deid}
    original_uids = {str(ds.SOPInstanceUID) for ds in sources} | {str(sources[0].StudyInstanceUID),
                                                                   str(sources[0].SeriesInstanceUID)}
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for series in seg.ReferencedSeriesSequence for item in series.ReferencedInstanceSequence}
    assert referenced and referenced <= deid_sops, "SEG references images the de-identified series lacks"
    per_frame = {str(src.ReferencedSOPInstanceUID)
                 for frame in seg.PerFrameFunctionalGroupsSequence
                 for deriv in frame.DerivationImageSequence for src in deriv.SourceImageSequence}
    assert per_frame <= deid_sops
    assert str(seg.StudyInstanceUID) == str(deid[0].StudyInstanceUID)
    assert str(seg.FrameOfReferenceUID) == str(deid[0].FrameOfReferenceUID)
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == str(deid[0].SeriesInstanceUID)
    seg_text = (out / "series_seg.dcm").read_bytes()
    assert not [u for u in original_uids if u and u.encode() in seg_text], "original UIDs survive anonymization"
