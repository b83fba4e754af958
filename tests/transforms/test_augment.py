from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from scipy import ndimage

from medseg.config import LossConfig
from medseg.losses import build_loss
from medseg.transforms import (
    AUGMENTATIONS,
    build_augmentation_2d,
    build_augmentation_3d,
    cutmix_batch,
    mix_batch,
    mixed_loss,
    mixup_batch,
)
from medseg.transforms.weightmap import compute_weight_map, objects_from_mask

PATCH = (48, 64)  # not square, not a multiple of the image size


def blobs(shape: tuple[int, ...], count: int, seed: int = 0, values: tuple[int, ...] = (1,)) -> np.ndarray:
    """Random discs/balls of radius 4-10 px, class values cycling through ``values``."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    mask = np.zeros(shape, dtype=np.int64)
    for i in range(count):
        c = rng.uniform(0, shape)
        r = rng.uniform(4, 10)
        inside = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True)) < r * r
        mask[inside] = values[i % len(values)]
    return mask


def off_edge(disagree: np.ndarray, mask: np.ndarray) -> int:
    """Pixels where two renderings of a mask disagree, not counting a 1-pixel band on each side of edges
    (linear vs nearest resampling may differ there)."""
    fg = mask > 0
    band = ndimage.binary_dilation(fg) & ~ndimage.binary_erosion(fg)
    return int((disagree & ~band).sum())


def midpoint_threshold(image: np.ndarray, mask: np.ndarray) -> float:
    # Brightness/contrast/gamma move both levels; the threshold follows them.
    fg = ndimage.binary_erosion(mask > 0, iterations=2)
    bg = ndimage.binary_erosion(mask == 0, iterations=2)
    return 0.5 * (float(np.median(image[fg])) + float(np.median(image[bg])))


def edge_ratio(disagree: np.ndarray, mask: np.ndarray) -> float:
    """Disagreeing pixels per pixel of the 1-pixel bands either side of the mask's edges."""
    fg = mask > 0
    band = ndimage.binary_dilation(fg) & ~ndimage.binary_erosion(fg)
    return float(disagree.sum() / max(band.sum(), 1))


@pytest.mark.parametrize("preset", AUGMENTATIONS.names())
@pytest.mark.parametrize("channels", [1, 3])
def test_image_mask_and_weight_stay_aligned(preset: str, channels: int) -> None:
    mask = blobs((75, 101), 14)  # odd size, smaller than the largest crops: reflect-padded
    image = np.repeat(mask[..., None].astype(np.float32), channels, axis=-1)  # the image IS the mask
    # Class weight 40 on objects, at most 1 + w0 = 11 on background: weight > 25 marks the objects.
    weight = compute_weight_map(objects_from_mask(mask), class_weights=[1.0, 40.0])
    ratios = []
    for seed in range(5):
        out = build_augmentation_2d(preset, PATCH, channels, seed=seed)(image, mask, weight)
        img, m, w = out["image"], out["mask"], out["weight"]
        assert img.shape == (*PATCH, channels) and img.dtype == np.float32
        assert m.shape == PATCH and m.dtype == mask.dtype
        assert w.shape == PATCH and w.dtype == np.float32
        assert set(np.unique(m)) <= {0, 1}
        assert 0 < m.mean() < 1  # the patch shows both classes, so alignment is actually tested
        gray = img.mean(axis=-1)
        img_off = (gray > midpoint_threshold(gray, m)) != (m > 0)
        w_off = (w > 25) != (m > 0)
        # Linear (image, weight) and nearest (mask) resampling may round an edge differently, and each
        # warp of a chain rounds again; away from edges they must agree ("tiny": 15 of 3072 pixels).
        budget = int(0.005 * m.size)
        assert off_edge(img_off, m) <= budget, (preset, seed)
        assert off_edge(w_off, m) <= budget, (preset, seed)
        ratios += [edge_ratio(img_off, m), edge_ratio(w_off, m)]
    # At the edges, too, most pixels agree. A half-pixel shift in a single resize (cv2 INTER_NEAREST for the
    # mask against INTER_LINEAR for the image) disagrees on ~25% of edge pixels; unbiased rounding through
    # the heaviest preset's chain of warps on ~15%.
    assert np.mean(ratios) < 0.18, (preset, np.round(ratios, 3))


def test_zoom_crop_alone_keeps_mask_edges_on_image_edges() -> None:
    mask = blobs((75, 101), 14)
    image = mask[..., None].astype(np.float32)
    ratios = []
    for seed in range(5):
        out = build_augmentation_2d("light", PATCH, 1, seed=seed)(image, mask)
        off = (out["image"][..., 0] > 0.5) != (out["mask"] > 0)
        ratios.append(edge_ratio(off, out["mask"]))
    assert np.mean(ratios) < 0.1, np.round(ratios, 3)  # measured ~0.05; ~0.25 with cv2.INTER_NEAREST


@pytest.mark.parametrize("preset", AUGMENTATIONS.names())
def test_mask_values_stay_in_the_label_set(preset: str) -> None:
    mask = blobs((90, 90), 20, seed=3, values=(3, 7, 255)).astype(np.uint8)  # non-contiguous labels
    image = np.random.default_rng(0).random((90, 90, 3)).astype(np.float32)
    seen: set[int] = set()
    for seed in range(4):
        out = build_augmentation_2d(preset, (64, 64), 3, seed=seed)(image, mask)
        assert "weight" not in out
        assert out["mask"].dtype == np.uint8
        values = set(np.unique(out["mask"]).tolist())
        assert values <= {0, 3, 7, 255}
        seen |= values
    assert len(seen) > 2


def test_same_seed_same_result_and_seeds_differ() -> None:
    mask = blobs((80, 80), 10)
    image = np.random.default_rng(1).random((80, 80, 1)).astype(np.float32)
    a = build_augmentation_2d("heavy", (64, 64), 1, seed=5)(image, mask)
    b = build_augmentation_2d("heavy", (64, 64), 1, seed=5)(image, mask)
    c = build_augmentation_2d("heavy", (64, 64), 1, seed=6)(image, mask)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["image"], c["image"])


def test_seeded_transforms_draw_independently() -> None:
    # albumentations 2.0.8 seeds every transform of a Compose with the same seed, so two p=0.5 flips fire
    # together or not at all; Augment2D makes them share one stream instead.
    import albumentations as A

    from medseg.transforms import Augment2D

    aug = Augment2D(A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)], seed=0), A.Compose([], seed=1), 1)
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    mask = np.zeros((4, 4), np.uint8)
    seen = set()
    for _ in range(64):
        out = aug(image, mask)["image"][..., 0]
        h = np.array_equal(out[:, ::-1], image[..., 0]) or np.array_equal(out[::-1, ::-1], image[..., 0])
        v = np.array_equal(out[::-1], image[..., 0]) or np.array_equal(out[::-1, ::-1], image[..., 0])
        seen.add((h, v))
    assert seen == {(False, False), (True, False), (False, True), (True, True)}, seen


def test_augmentation_state_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    mask = blobs((80, 80), 10)
    image = np.random.default_rng(1).random((80, 80, 1)).astype(np.float32)
    aug = build_augmentation_2d("heavy", (64, 64), 1, seed=5)
    aug(image, mask)
    torch.save(aug.state_dict(), tmp_path / "state.pt")
    expected = [aug(image, mask)["image"] for _ in range(3)]
    aug.reseed(123)  # somewhere else entirely ...
    aug.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # ... and back
    for want in expected:
        np.testing.assert_array_equal(aug(image, mask)["image"], want)
    aug.reseed(7)
    other = build_augmentation_2d("heavy", (64, 64), 1, seed=5)
    other.reseed(8)
    assert not np.array_equal(aug(image, mask)["image"], other(image, mask)["image"])


def test_constant_padding_gives_zero_weight_outside_the_image() -> None:
    mask = blobs((20, 24), 2)
    image = np.ones((20, 24, 1), dtype=np.float32)
    weight = np.ones((20, 24), dtype=np.float32)
    out = build_augmentation_2d("none", (64, 64), 1, padding_mode="constant", seed=0)(image, mask, weight)
    # A 20×24 image in a 64×64 patch: the rest is padding, which a weighted loss must ignore.
    assert out["weight"].sum() == pytest.approx(20 * 24)
    np.testing.assert_array_equal(out["image"][..., 0], out["weight"])


def test_bad_inputs_raise() -> None:
    aug = build_augmentation_2d("light", (32, 32), 3)
    with pytest.raises(ValueError, match="image must be"):
        aug(np.zeros((40, 40, 1), np.float32), np.zeros((40, 40), np.int64))
    with pytest.raises(ValueError, match="mask shape"):
        aug(np.zeros((40, 40, 3), np.float32), np.zeros((40, 41), np.int64))
    with pytest.raises(KeyError, match="valid: default, heavy, light, none"):
        build_augmentation_2d("extreme", (32, 32), 3)


@pytest.mark.parametrize("preset", ["none", "light", "default", "heavy"])
def test_3d_augmentation_keeps_volume_label_and_weight_aligned(preset: str) -> None:
    label = blobs((12, 32, 32), 6, seed=4)
    data = {
        "image": torch.from_numpy(label[None].astype(np.float32)),
        "label": torch.from_numpy(label[None]),
        "weight": torch.from_numpy(np.where(label > 0, 20.0, 1.0)[None].astype(np.float32)),
    }
    aug = build_augmentation_3d(preset, weight_keys=("weight",))
    assert isinstance(aug, Compose)
    for seed in range(3):
        aug.set_random_state(seed)
        out = aug(dict(data))
        img, lab, w = (np.asarray(out[k])[0] for k in ("image", "label", "weight"))
        assert img.shape == lab.shape == w.shape == (12, 32, 32)
        assert set(np.unique(lab)) <= {0, 1}
        budget = int(0.005 * lab.size)
        assert off_edge((img > midpoint_threshold(img, lab)) != (lab > 0), lab) <= budget
        assert off_edge((w > 10) != (lab > 0), lab) <= budget


def test_mixup_mixes_images_and_the_loss() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, 8, 8)
    target = torch.randint(0, 2, (4, 8, 8))
    weight = torch.rand(4, 8, 8)
    mixed = mixup_batch(image, target, weight, alpha=0.4, generator=g)
    assert 0.0 <= mixed.lam <= 1.0 and mixed.target_b is not None
    # target_b is a permutation of the batch, and the image is the same mixture of the same partners.
    perm = [next(j for j in range(4) if torch.equal(target[j], mixed.target_b[i])) for i in range(4)]
    torch.testing.assert_close(mixed.image, mixed.lam * image + (1 - mixed.lam) * image[perm])
    torch.testing.assert_close(mixed.weight_b, weight[perm])
    loss = build_loss(LossConfig(name="ce"))
    logits = torch.randn(4, 2, 8, 8)
    expected = mixed.lam * loss(logits, target, weight) + (1 - mixed.lam) * loss(
        logits, target[perm], weight[perm]
    )
    torch.testing.assert_close(mixed_loss(loss, logits, mixed), expected)


def test_cutmix_pastes_the_same_box_into_image_target_and_weight() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (6, 16, 20))
    image = target[:, None].float()  # the image IS the target: alignment is visible
    weight = target.float() * 10
    mixed = cutmix_batch(image, target, weight, generator=g)
    torch.testing.assert_close(mixed.image[:, 0], mixed.target.float())
    torch.testing.assert_close(mixed.weight, mixed.target.float() * 10)
    assert not torch.equal(mixed.target, target)  # something was pasted
    assert mixed.target_b is None and mixed.lam == 1.0


def test_mix_batch_is_off_by_default() -> None:
    image, target = torch.randn(2, 1, 4, 4), torch.randint(0, 2, (2, 4, 4))
    out = mix_batch(image, target)
    assert out.image is image and out.target is target and out.target_b is None
    assert mix_batch(image, target, mixup=1.0).target_b is not None


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mix_batch_draws_the_share_from_the_configured_alpha(kind: str) -> None:
    """Beta(alpha, alpha): a small alpha puts the share near 0 or 1, a large one near 1/2 (for cutmix, the
    pasted box's area). Before the fix mix_batch dropped the alphas and always used the defaults."""
    image, target = torch.zeros(4, 1, 32, 32), torch.zeros(4, 32, 32, dtype=torch.long)
    image[:2] = 1.0  # half the batch is ones: a mixed or pasted sample shows the share it got
    g = torch.Generator().manual_seed(0)

    def spread(alpha: float) -> float:
        shares = []
        for _ in range(40):
            out = mix_batch(image, target, **{kind: 1.0, f"{kind}_alpha": alpha}, generator=g)
            if kind == "mixup":
                shares.append(out.lam)
            else:  # share of the box in a sample whose partner differs from it
                diff = (out.image[:, 0] != image[:, 0]).float().mean(dim=(1, 2))
                shares += [float(d) for d in diff if d > 0]
        return float(np.mean(np.abs(np.asarray(shares) - 0.5)))

    assert spread(0.05) > 0.3 > 0.1 > spread(50.0)


def test_importing_transforms_leaves_albumentations_and_monai_unloaded() -> None:
    import subprocess
    import sys

    code = ("import sys, medseg.transforms as t; "
            "assert not {'albumentations', 'monai'} & set(sys.modules), 'imported eagerly'; "
            "t.build_augmentation_2d; assert 'albumentations' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
