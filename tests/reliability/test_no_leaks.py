"""Nothing leaks: every temporary folder medseg makes for a zip (scan, DICOM listing, bundle) is gone once the
call returns or its result is released, whether the input was good or refused."""

from __future__ import annotations

import gc
import tempfile
import zipfile
from pathlib import Path

import pytest
import robust_harness as h
import torch

from medseg.bundle import load_bundle, save_bundle
from medseg.config import load_config
from medseg.errors import MedsegError
from medseg.io import list_dicom_series, read_scan


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.filterwarnings("ignore::medseg.io.ScanReadWarning")
def test_zip_reads_leave_no_temporary_files(private_tmp: Path, seeds: h.Seeds, scratch: Path) -> None:
    good = h.zip_folder(seeds["dicom_series"], scratch / "leak_series.zip", prefix="s/")
    assert read_scan(good).array.shape == (6, 96, 96)
    assert len(list_dicom_series(good)) == 1
    for case in h.zip_cases(seeds, scratch / "leak_zips"):
        try:
            read_scan(case.path)
        except MedsegError:
            pass
    assert list(private_tmp.iterdir()) == []


def test_bundle_zip_extraction_is_removed_with_the_bundle(private_tmp: Path, tmp_path: Path) -> None:
    cfg = load_config(None, ["name=tiny", "data.labels={0: bg, 1: thing}"])
    folder = save_bundle(tmp_path / "b", cfg, {"model": {"w": torch.ones(2, 3)}}, {"channels": 3}, "# tiny")
    archive = h.zip_folder(folder, tmp_path / "bundle.zip", prefix="b/")
    bundle = load_bundle(archive)
    assert torch.equal(bundle.load_members()["model"]["w"], torch.ones(2, 3))
    assert len(list(private_tmp.iterdir())) == 1  # the extraction, alive while the bundle is
    del bundle
    gc.collect()
    assert list(private_tmp.iterdir()) == []

    with zipfile.ZipFile(tmp_path / "not_a_bundle.zip", "w") as zf:
        zf.writestr("readme.txt", "no bundle here")
    with pytest.raises(MedsegError, match="not_a_bundle.zip: zip does not hold exactly one bundle"):
        load_bundle(tmp_path / "not_a_bundle.zip")
    assert list(private_tmp.iterdir()) == []
