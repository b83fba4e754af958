"""Random convolution (shape bias): the array/dict transforms, the augmentation that applies it per patch, and the
config key that turns it on in training (`augment.random_convolution`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.transforms.augment import build_augmentation_2d
from medseg.transforms.random_conv import RandomConvolution, RandomConvolutiond


def disc_image(channels: int = 3, size: int = 48) -> np.ndarray:
    """A bright textured disc on a dark background, ``(C, H, W)`` float32 in [0, 1]."""
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).astype(np.float32)
    texture = 0.15 * np.sin(xx / 1.5)[None] * disc
    return np.clip(np.repeat(0.1 + 0.7 * disc[None], channels, 0) + texture, 0, 1).astype(np.float32)


def test_random_convolution_changes_texture_and_keeps_the_shape() -> None:
    x = disc_image()
    changed = 0
    for seed in range(8):
        t = RandomConvolution(prob=1.0, kernel_sizes=(3, 5, 7), mix=False)
        t.set_random_state(seed)
        y = t(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6  # clipped to the input's range
        changed += not np.allclose(y, x, atol=0.05)
        # The disc's boundary is still where it was: the gradient magnitude peaks on the same ring.
        edges_x = ndimage.gaussian_gradient_magnitude(x.mean(0), 1.0)
        edges_y = ndimage.gaussian_gradient_magnitude(y.mean(0), 1.0)
        ring = edges_x > 0.5 * edges_x.max()
        assert edges_y[ring].mean() > 2 * edges_y[~ring].mean() or np.ptp(y) < 1e-3, seed
    assert changed >= 6


def test_random_convolution_is_seeded_optional_and_its_state_restores() -> None:
    x = disc_image()
    assert RandomConvolution(prob=0.0)(x) is x
    a, b = RandomConvolution(prob=1.0), RandomConvolution(prob=1.0)
    a.set_random_state(3), b.set_random_state(3)
    np.testing.assert_array_equal(a(x), b(x))
    state = a.state_dict()
    first = a(x)
    a.load_state_dict(state)
    np.testing.assert_array_equal(a(x), first)
    t = torch.from_numpy(x)
    assert isinstance(a(t), torch.Tensor)
    with pytest.raises(ValueError, match="odd"):
        RandomConvolution(kernel_sizes=(2,))


def test_dictionary_version_applies_one_filter_to_every_key() -> None:
    x = disc_image()
    d = RandomConvolutiond(keys=["a", "b"], prob=1.0)
    d.set_random_state(5)
    out = d({"a": x, "b": x.copy(), "label": np.zeros(x.shape[1:])})
    np.testing.assert_array_equal(out["a"], out["b"])
    assert not np.allclose(out["a"], x)
    np.testing.assert_array_equal(out["label"], 0)


def test_augmentation_with_random_convolution_changes_images_not_masks() -> None:
    image = np.moveaxis(disc_image(size=64), 0, -1)
    mask = (image[..., 0] > 0.5).astype(np.uint8)
    plain = build_augmentation_2d("none", (48, 48), 3, seed=0)
    shaped = build_augmentation_2d("none", (48, 48), 3, seed=0, random_convolution=1.0)
    a, b = plain(image, mask), shaped(image, mask)
    np.testing.assert_array_equal(a["mask"], b["mask"])  # same crop: the geometric stream is untouched
    assert not np.allclose(a["image"], b["image"], atol=0.02)
    state = shaped.state_dict()
    again = shaped(image, mask)["image"]
    shaped.load_state_dict(state)
    np.testing.assert_array_equal(shaped(image, mask)["image"], again)  # exact resume covers its generator
