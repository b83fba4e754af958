"""The training cache and patches: cases held on the model grid in their own dtype, patches normalised exactly as
the whole image, foreground-centred sampling as planned, and the three cache kinds giving the same data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.config import load_config
from medseg.data import discover_cases
from medseg.data.dataset import PatchDataset, WholeCaseDataset, build_case_cache, cache_nbytes, case_input
from medseg.transforms.augment import build_augmentation_2d


def _dataset(root: Path, n: int = 6, size=(96, 128), rgb: bool = True) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        shape = (*size, 3) if rgb else size
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[10:14, 20:24] = 255  # one tiny object: 16 of 12288 pixels
        Image.fromarray(image).save(root / "images" / f"c{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"c{i}.png")
    return root


def _cfg(root: Path, *sets: str):
    return load_config(None, [f"data.root={root}", "data.patch_size=[32, 32]", "data.channels=3", *sets])


def test_cache_holds_source_dtype_on_the_model_grid(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    cfg = _cfg(root, "data.resample=size", "data.target_size=64")
    cache = build_case_cache(discover_cases(root), cfg)
    d = cache[0]
    assert d["image"].dtype == np.uint8 and d["label"].dtype == np.uint8
    assert d["image"].shape[0] == 3 and np.sqrt(np.prod(d["image"].shape[1:])) == pytest.approx(64, abs=1)
    assert d["bounds"] is not None and len(d["fg_points"]) > 0
    # 6 cases of 3 x ~55 x ~74 bytes + labels: nothing like float32 copies at full size
    assert cache_nbytes(cache) < 6 * 64 * 64 * 5


def test_a_patch_is_normalised_exactly_as_the_whole_image(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    cfg = _cfg(root)
    cache = build_case_cache(discover_cases(root), cfg)
    d = cache[0]
    whole = case_input(d, cfg.data)
    window = (slice(5, 40), slice(30, 90))
    np.testing.assert_array_equal(case_input(d, cfg.data, window=window), whole[(slice(None), *window)])
    val = WholeCaseDataset(cache, cfg)[0]
    assert val["image"].dtype.is_floating_point and float(val["image"].max()) <= 1.0


@pytest.mark.parametrize("share, expect", [(1.0, "most"), (0.0, "few")])
def test_foreground_share_centres_patches_on_foreground(tmp_path: Path, share: float, expect: str) -> None:
    root = _dataset(tmp_path / "d")
    cfg = _cfg(root, f"data.foreground_share={share}")
    cache = build_case_cache(discover_cases(root), cfg)
    augment = build_augmentation_2d("none", (32, 32), 3, seed=0)
    ds = PatchDataset(cache, cfg, augment, samples_per_epoch=200)
    with_fg = np.mean([bool(ds[i]["label"].any()) for i in range(200)])
    if expect == "most":
        assert with_fg > 0.95
    else:  # a uniform 32² patch holds the 4x4 object about (35*35)/(96*128) of the time
        assert with_fg < 0.3


@pytest.mark.parametrize("mode", ["disk", "none"])
def test_every_cache_kind_gives_the_same_cases(tmp_path: Path, mode: str) -> None:
    root = _dataset(tmp_path / "d", n=3)
    cases = discover_cases(root)
    memory = build_case_cache(cases, _cfg(root))
    other = build_case_cache(cases, _cfg(root, f"data.cache={mode}"), cache_dir=tmp_path / "cache")
    for i in range(3):
        a, b = memory[i], other[i]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert (len(files) == 3) if mode == "disk" else not files


def test_sampler_state_resumes_the_same_patches(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", n=3)
    cfg = _cfg(root, "data.foreground_share=0.5")
    cache = build_case_cache(discover_cases(root), cfg)
    ds = PatchDataset(cache, cfg, build_augmentation_2d("light", (32, 32), 3, seed=0), samples_per_epoch=10)
    ds[0]
    state = ds.state_dict()
    after = [ds[i]["image"].numpy() for i in range(3)]
    ds.load_state_dict(state)
    again = [ds[i]["image"].numpy() for i in range(3)]
    for a, b in zip(after, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_epoch_shorter_than_the_dataset_still_draws_every_case(tmp_path: Path, monkeypatch) -> None:
    """Bug: items were taken as ``items[index % len(items)]`` and the loader hands out indices below the epoch
    length, so with ``train.samples_per_epoch`` under the number of cases (or of slices of a volume dataset) the
    cases after that point were never trained on."""
    root = _dataset(tmp_path / "d", n=6)
    cfg = _cfg(root)
    cache = build_case_cache(discover_cases(root), cfg)
    ds = PatchDataset(cache, cfg, build_augmentation_2d("none", (32, 32), 3, seed=0), samples_per_epoch=2)
    seen: list[str] = []
    centre = PatchDataset._centre
    monkeypatch.setattr(PatchDataset, "_centre", lambda self, d, z: (seen.append(d["id"]), centre(self, d, z))[1])
    for _ in range(20):  # 20 epochs of 2 samples, through the indices a loader gives
        for i in range(len(ds)):
            ds[i]
    assert len(set(seen)) == 6, sorted(set(seen))
