"""The fingerprint against values computed independently: spacings from SimpleITK, sizes from Pillow headers,
object thickness of drawn discs, pooled foreground percentiles with numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medseg.data import discover_cases
from medseg.planning.fingerprint import Fingerprint, compute_fingerprint, object_stats


def test_hippocampus_spacing_and_shape_match_simpleitk(datasets_dir: Path) -> None:
    cases = discover_cases(datasets_dir / "msd_hippocampus")[:6]
    fp = compute_fingerprint(cases, max_cases=None)
    assert fp.ndim == 3 and len(fp.cases) == 6
    for case, c in zip(cases, fp.cases, strict=True):
        image = sitk.ReadImage(str(case.image))
        assert c.spacing == pytest.approx(tuple(reversed(image.GetSpacing())))
        assert c.shape == tuple(reversed(image.GetSize()))
        assert c.spacing_stated
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask)))
        values, counts = np.unique(labels, return_counts=True)
        assert c.mask_values == dict(zip(values.tolist(), counts.tolist(), strict=True))


def test_dsb2018_size_range_matches_pillow_headers(datasets_dir: Path) -> None:
    cases = discover_cases(datasets_dir / "dsb2018_nuclei")[::11]  # 61 cases spread over the set
    fp = compute_fingerprint(cases, max_cases=None)
    sizes = np.array([Image.open(c.image).size[::-1] for c in cases])  # (h, w) from the header
    assert fp.summary()["shape_min"] == sizes.min(0).tolist()
    assert fp.summary()["shape_max"] == sizes.max(0).tolist()
    assert not fp.spacing_stated  # PNGs without pHYs: pixels, not mm
    rgb = sum(Image.open(c.image).mode == "RGB" for c in cases)
    assert sum(c.channels == 3 for c in fp.cases) == rgb


def test_object_count_and_thickness_of_drawn_discs() -> None:
    yy, xx = np.mgrid[:200, :200]
    label = np.zeros((200, 200), np.uint8)
    for cy, cx in ((40, 40), (120, 60), (150, 160)):
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= 10**2] = 1  # discs of radius 10: 21 px across
    label[5:8, 100:190] = 2  # a bar 3 px thick
    discs, bar = object_stats(label, 1), object_stats(label, 2)
    assert discs.count == 3 and discs.median_voxels == pytest.approx(np.pi * 100, rel=0.05)
    assert discs.median_thickness == pytest.approx(20.0, abs=1.0)
    assert bar.count == 1 and bar.median_thickness == pytest.approx(3.0, abs=1.0)


def test_pooled_foreground_statistics_and_unreadable_cases(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    values = []
    for i in range(4):
        image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[4:12, 4:12] = 255
        values.append(image[mask > 0])
        Image.fromarray(image).save(tmp_path / "images" / f"c{i}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"c{i}.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "masks" / "broken.png")
    fp = compute_fingerprint(discover_cases(tmp_path), max_cases=None)
    assert len(fp.cases) == 4 and len(fp.problems) == 1 and "broken.png" in fp.problems[0]
    pooled = np.concatenate(values).astype(float)
    assert fp.foreground_intensity.p005 == pytest.approx(np.percentile(pooled, 0.5), abs=1.0)
    assert fp.foreground_intensity.p995 == pytest.approx(np.percentile(pooled, 99.5), abs=1.0)
    assert fp.foreground_intensity.mean == pytest.approx(pooled.mean(), abs=0.5)
    assert fp.mask_values() == [0, 255] and fp.foreground_fraction() == pytest.approx(64 / 1024)
    # JSON round trip keeps everything the planner reads
    path = fp.save(tmp_path / "fp.json")
    again = Fingerprint.load(path)
    assert again.summary() == fp.summary() and again.cases[0].objects == fp.cases[0].objects


def test_sampling_bounds_the_cases_read(datasets_dir: Path) -> None:
    cases = discover_cases(datasets_dir / "montgomery_cxr_lung")
    fp = compute_fingerprint(cases, max_cases=7)
    assert fp.n_cases == len(cases) and len(fp.cases) == 7
    assert fp.cases[0].id == cases[0].id and fp.cases[-1].id == cases[-1].id  # spread over the list
