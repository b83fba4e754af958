"""``medseg predict`` over a folder where some inputs are broken: every good input is segmented and written,
every bad one is listed with its reason, and nothing of the bad ones (or half of anything) lands in the output.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import robust_harness as h
from PIL import Image
from typer.testing import CliRunner

from medseg.cli import app
from medseg.io import read_scan

runner = CliRunner()


def _inputs(seeds: h.Seeds, datasets_dir: Path, folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write the batch; return (good: input name -> mask file name, bad: input name -> expected reason)."""
    folder.mkdir()
    good, bad = {}, {}
    dsb = sorted((datasets_dir / "dsb2018_nuclei" / "images").iterdir())
    for p in dsb[:2]:
        shutil.copy(p, folder / p.name)
        good[p.name] = f"{p.stem}_mask.png"
    shutil.copy(seeds["jpg"], folder / "nuclei.jpg")
    good["nuclei.jpg"] = "nuclei_mask.png"
    shutil.copy(seeds["tiff"], folder / "em.tif")  # two inputs with one stem: neither output may overwrite
    good["em.tif"] = "em_tif_mask.png"
    Image.open(seeds["tiff"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "em.png")
    good["em.png"] = "em_png_mask.png"
    shutil.copy(datasets_dir / "msd_hippocampus/images/hippocampus_003.nii.gz", folder / "hippo.nii.gz")
    good["hippo.nii.gz"] = "hippo_mask.nii.gz"
    h.zip_folder(seeds["dicom_series"], folder / "ct_series.zip", prefix="series/")
    good["ct_series.zip"] = "ct_series_mask.nii.gz"
    shutil.copytree(seeds["dicom_series"], folder / "ct_folder")
    good["ct_folder"] = "ct_folder_mask.nii.gz"

    png = (folder / dsb[0].name).read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 3])
    bad["truncated.png"] = "truncated"
    (folder / "huge.png").write_bytes(h.png_with_ihdr(png, width=200_000, height=1000))
    bad["huge.png"] = "too large"
    (folder / "not_an_image.jpg").write_bytes(b"\xff\xd8\xff this is text")
    bad["not_an_image.jpg"] = "not a readable image"
    frames = [Image.fromarray(np.zeros((8, 8), np.uint8)), Image.fromarray(np.ones((8, 8), np.uint8))]
    frames[0].save(folder / "pages.tif", save_all=True, append_images=frames[1:])
    bad["pages.tif"] = "multi-page"
    nii = gzip.decompress(seeds.data("nifti"))
    (folder / "cut.nii.gz").write_bytes(gzip.compress(nii[: len(nii) // 2]))
    bad["cut.nii.gz"] = "truncated NIfTI"
    raw = nii[:352]
    (folder / "four_d.nii.gz").write_bytes(gzip.compress(
        h.nifti_set(raw, dim=(4, 35, 51, 35, 2, 1, 1, 1)) + nii[352:] * 2))
    bad["four_d.nii.gz"] = "4D image"
    bomb = folder / "bomb.zip"
    bomb.write_bytes(h.raw_zip([{"name": "a.dcm", "data": h.deflate(b"\0" * 2**25), "method": 8,
                                 "crc": __import__("zlib").crc32(b"\0" * 2**25), "size": 2**25}]))
    bad["bomb.zip"] = "zip bomb"
    h.zip_folder(seeds["dicom_series"], folder / "slip.zip", prefix="../")
    bad["slip.zip"] = "zip slip"
    broken_series = folder / "broken_series"
    shutil.copytree(seeds["dicom_series"], broken_series)
    for f in broken_series.iterdir():
        f.write_bytes(f.read_bytes()[:1500])  # every slice cut inside its header
    bad["broken_series"] = "no DICOM series or image file found"
    return good, bad


def test_predict_batch_writes_every_good_input_and_lists_every_bad_one(
    random_bundle: Path, seeds: h.Seeds, datasets_dir: Path, tmp_path: Path
) -> None:
    good, bad = _inputs(seeds, datasets_dir, tmp_path / "in")
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(random_bundle), str(tmp_path / "in"), "--out", str(out),
                              "--device", "cpu"])
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert f"{len(good)} of {len(good) + len(bad)} inputs segmented" in text, res.output
    for name, reason in bad.items():
        assert f"failed {name}:" in text, (name, res.output)
        line = text.split(f"failed {name}:", 1)[1].split(" failed ", 1)[0]
        assert reason in line, (name, reason, line)
    for name in good:
        assert f"failed {name}:" not in text, (name, res.output)

    for name, mask_name in good.items():
        mask = read_scan(out / mask_name)
        source = read_scan(tmp_path / "in" / name)
        assert mask.spatial_shape == source.spatial_shape, name
        assert mask.geometry.same_grid(source.geometry), name
    written = {p.name for p in out.iterdir()}
    for name in bad:
        stem = name.split(".")[0]
        assert not any(w.startswith(stem + "_") for w in written), (name, written)
    assert not [w for w in written if w.startswith(".")], f"temporary files left: {written}"
