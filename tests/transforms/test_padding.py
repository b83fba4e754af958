from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.transforms.padding import crop_padding, pad_to_multiple, pad_to_size, reflect_indices


@pytest.fixture
def chw() -> np.ndarray:
    return np.random.default_rng(0).random((3, 37, 53)).astype(np.float32)


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_pad_to_multiple_round_trip_numpy_odd_size(chw: np.ndarray, mode: str) -> None:
    padded, widths = pad_to_multiple(chw, 32, mode=mode)
    assert padded.shape == (3, 64, 64)
    assert widths == ((0, 0), (13, 14), (5, 6))  # centred; the odd pixel goes after
    np.testing.assert_array_equal(crop_padding(padded, widths), chw)
    expected = np.pad(chw, widths, mode=mode)
    np.testing.assert_array_equal(padded, expected)


def test_pad_to_multiple_round_trip_torch_batch(chw: np.ndarray) -> None:
    x = torch.from_numpy(np.stack([chw, chw[::-1].copy()]))  # (2, 3, 37, 53)
    padded, widths = pad_to_multiple(x, 32)
    assert isinstance(padded, torch.Tensor) and padded.shape == (2, 3, 64, 64)
    torch.testing.assert_close(crop_padding(padded, widths), x, rtol=0, atol=0)
    # Same values as numpy's reflect (torch's F.pad agrees here because the pad is smaller than the image).
    np.testing.assert_array_equal(padded.numpy(), np.pad(x.numpy(), widths, mode="reflect"))
    torch.testing.assert_close(padded, F.pad(x, (5, 6, 13, 14), mode="reflect"), rtol=0, atol=0)


def test_crop_padding_crops_a_prediction_with_other_channels(chw: np.ndarray) -> None:
    x = torch.from_numpy(chw)[None]  # (1, 3, 37, 53)
    padded, widths = pad_to_multiple(x, 32)
    logits = torch.randn(1, 5, *padded.shape[2:])  # a network's (B, K, H', W') output
    assert crop_padding(logits, widths).shape == (1, 5, 37, 53)


def test_reflect_beyond_image_size_follows_numpy() -> None:
    # numpy keeps mirroring when the pad exceeds the image: [0 1 2] -> ... 1 2 1 0 1 2 1 0 ...
    np.testing.assert_array_equal(
        np.pad(np.arange(3), 7, mode="reflect"), [1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1]
    )
    for n in (1, 2, 3, 7):
        for before, after in ((0, 0), (1, 0), (n, 2 * n + 1), (17, 4)):
            expected = np.pad(np.arange(n), (before, after), mode="reflect")
            np.testing.assert_array_equal(np.arange(n)[reflect_indices(n, before, after)], expected)


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_pad_to_size_larger_than_image_numpy_and_torch_agree(chw: np.ndarray, mode: str) -> None:
    padded_np, widths = pad_to_size(chw, 256, mode=mode)
    assert padded_np.shape == (3, 256, 256)
    np.testing.assert_array_equal(padded_np, np.pad(chw, widths, mode=mode))
    np.testing.assert_array_equal(crop_padding(padded_np, widths), chw)

    x = torch.from_numpy(chw)[None]
    if mode == "reflect":  # torch refuses: this is why the tensor path gathers indices itself
        with pytest.raises(RuntimeError):
            F.pad(x, (101, 102, 109, 110), mode="reflect")
    padded_t, widths_t = pad_to_size(x, (256, 256), mode=mode)
    assert widths_t == ((0, 0), *widths)
    np.testing.assert_array_equal(padded_t[0].numpy(), padded_np)
    torch.testing.assert_close(crop_padding(padded_t, widths_t), x, rtol=0, atol=0)


def test_pad_to_size_leaves_large_axes_alone_and_handles_one_pixel_axes() -> None:
    a = np.arange(1 * 40).reshape(1, 40).astype(np.float32)  # (H=1, W=40)
    padded, widths = pad_to_size(a, (8, 32))
    assert padded.shape == (8, 40) and widths == ((3, 4), (0, 0))
    np.testing.assert_array_equal(padded, np.repeat(a, 8, axis=0))  # a 1-pixel axis mirrors to copies
    t, _ = pad_to_size(torch.from_numpy(a), (8, 32))
    np.testing.assert_array_equal(t.numpy(), padded)


def test_3d_spatial_axes_and_per_axis_multiples() -> None:
    vol = np.random.default_rng(1).random((2, 5, 37, 53))
    padded, widths = pad_to_multiple(vol, (4, 16, 32), spatial_axes=(1, 2, 3))
    assert padded.shape == (2, 8, 48, 64)
    np.testing.assert_array_equal(crop_padding(padded, widths), vol)
    tp, tw = pad_to_multiple(torch.from_numpy(vol), (4, 16, 32), spatial_axes=(-3, -2, -1))
    assert tw == widths
    np.testing.assert_array_equal(tp.numpy(), padded)


def test_constant_value_and_already_a_multiple() -> None:
    a = np.ones((2, 30, 32), dtype=np.float32)
    padded, widths = pad_to_multiple(a, 32, mode="constant", value=-1.0)
    assert padded.shape == (2, 32, 32) and widths[2] == (0, 0)
    assert padded[:, 0].min() == -1.0 and padded[:, 1:31].min() == 1.0
    same, none = pad_to_multiple(np.ones((32, 64)), 32)
    assert none == ((0, 0), (0, 0)) and same.shape == (32, 64)


def test_torch_reflect_padding_passes_gradients() -> None:
    x = torch.randn(1, 1, 5, 6, requires_grad=True)
    padded, _ = pad_to_size(x, 20)
    padded.sum().backward()
    # Each source pixel is used at least once, mirrored pixels more often.
    assert x.grad is not None and x.grad.min() >= 1 and x.grad.sum() == 400


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        pad_to_multiple(np.ones((4, 4)), 0)
    with pytest.raises(ValueError):
        pad_to_multiple(np.ones((4, 4)), 8, mode="edge")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        crop_padding(np.ones((4, 4)), ((0, 0),))
