"""Overlap-tile passes and test-time augmentation: exact sizes, exact mapping back, full coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inference_helpers import Pointwise, SymmetricConv, tiny_config

from medseg.config import InferenceConfig
from medseg.inference import Predictor
from medseg.inference.tiling import predict_logits_2d, predict_logits_case
from medseg.inference.tta import build_views, predict_probs_tta
from medseg.io import Geometry, Scan


def _softmax_plain(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)


def test_odd_size_517x389_gives_exactly_that_size() -> None:
    cfg = tiny_config("inference.tile_size=[128, 128]")
    rng = np.random.default_rng(0)
    scan = Scan(rng.integers(0, 256, (517, 389), dtype=np.uint8), Geometry.identity((517, 389)), "odd.png")
    pred = Predictor([Pointwise()], cfg, device="cpu").predict_scan(scan)
    assert pred.mask.shape == (517, 389) and pred.mask.dtype == np.uint8
    assert pred.probs.shape == (2, 517, 389) and pred.uncertainty.shape == (517, 389)
    assert pred.geometry == scan.geometry
    # A pointwise model is unaffected by tiling: tiles, blending and mirror margins must land every pixel back
    # exactly where it came from.
    x = Predictor([Pointwise()], cfg, device="cpu").prepare(scan)[0][None]
    np.testing.assert_allclose(pred.probs, _softmax_plain(Pointwise(), x)[0].numpy(), atol=1e-5)


def test_tiles_use_config_tile_size_and_blend_seamlessly() -> None:
    seen: list[tuple[int, int]] = []

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return Pointwise()(x)

    x = torch.rand(1, 3, 150, 97)
    cfg = InferenceConfig(tile_size=(64, 48), overlap=0.5)
    out = predict_logits_2d(model_fn, x, cfg)
    assert out.shape == (1, 2, 150, 97)
    assert set(seen) == {(64, 48)}  # every tile has the configured size
    torch.testing.assert_close(out, Pointwise()(x), atol=1e-5, rtol=0)


def test_real_network_any_size_and_volume(tmp_path) -> None:
    from medseg.models import build_model

    cfg = tiny_config()
    model = build_model(cfg.model, 3, 2).eval()
    with torch.no_grad():
        out2d = predict_logits_case(model, torch.rand(3, 67, 45), 0, cfg.inference)
        vol = predict_logits_case(model, torch.rand(3, 3, 37, 70), 0, cfg.inference)
    assert out2d.shape == (2, 67, 45) and vol.shape == (2, 3, 37, 70)


def test_flip_tta_of_flip_equivariant_model_equals_plain() -> None:
    cfg = InferenceConfig(tile_size=(64, 64))
    x = torch.rand(2, 3, 60, 44)
    views = build_views("flips", (60, 44), cfg)
    assert len(views) == 4
    plain = _softmax_plain(SymmetricConv(), x)
    with torch.no_grad():
        tta = predict_probs_tta([SymmetricConv()], x, cfg, views=views).mean()
        broken = predict_probs_tta([SymmetricConv(symmetric=False)], x, cfg, views=views).mean()
    torch.testing.assert_close(tta, plain, atol=1e-6, rtol=0)
    # The flips really happen: a model that is not flip-equivariant gives a different average.
    assert (broken - _softmax_plain(SymmetricConv(symmetric=False), x)).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(517, 389), (40, 30), (64, 200)])
def test_multicrop_covers_every_pixel_and_maps_back_exactly(shape: tuple[int, int]) -> None:
    cfg = InferenceConfig(tile_size=(64, 64))
    x = torch.rand(1, 3, *shape)
    views = build_views("multicrop", shape, cfg)
    assert len(views) == 5 and len({v.offset for v in views}) == 5  # 4 corners + centre, all different
    acc = predict_probs_tta([Pointwise()], x, cfg, views=views)
    assert acc.count is not None and acc.count.shape == shape
    assert int(acc.count.min()) == int(acc.count.max()) == 5  # no pixel left out, none counted twice
    torch.testing.assert_close(acc.mean(), _softmax_plain(Pointwise(), x), atol=1e-5, rtol=0)


def test_multicrop_shifts_the_tile_grid() -> None:
    """Multi-crop passes see the image at different offsets, so a model that is not shift-invariant (here the
    border effect of zero padding inside each tile) gives a different average than one tiling."""
    cfg = InferenceConfig(tile_size=(64, 64))
    x = torch.rand(1, 3, 150, 130)
    model = SymmetricConv()
    plain = predict_probs_tta([model], x, cfg, views=build_views("none", (150, 130), cfg)).mean()
    crops = predict_probs_tta([model], x, cfg, views=build_views("multicrop", (150, 130), cfg)).mean()
    assert (plain - crops).abs().max() > 1e-4


def test_full_tta_passes_and_rotations_map_back() -> None:
    cfg = InferenceConfig(tile_size=(64, 64), tta="full")
    assert len(build_views("full", (50, 70), cfg)) == 20
    views = build_views("full", (50, 70), cfg, rotations=True)
    assert len(views) == 40
    x = torch.rand(1, 3, 50, 70)  # not square: rotated passes swap H and W
    acc = predict_probs_tta([Pointwise()], x, cfg, views=views)
    assert int(acc.count.min()) == 40
    torch.testing.assert_close(acc.mean(), _softmax_plain(Pointwise(), x), atol=1e-5, rtol=0)


def test_predictor_passes_and_progress() -> None:
    cfg = tiny_config("inference.tta=flips")
    predictor = Predictor([Pointwise(), Pointwise()], cfg, device="cpu")
    assert predictor.passes((30, 40)) == 8
    scan = Scan(np.random.default_rng(1).random((5, 30, 40), dtype=np.float32), Geometry.identity((5, 30, 40)))
    seen: list[float] = []
    predictor.predict_scan(scan, progress=seen.append)
    # Issue 16: with a progress callback a small volume goes slice by slice (not in one batch of 4 that showed 0 %
    # until the end): 5 slices × 2 members × 4 flips.
    assert len(seen) == 40 and seen == sorted(seen) and seen[-1] == 1.0 and seen[0] > 0
    # The same probabilities as without progress (batched as configured).
    quiet = predictor.predict_scan(scan)
    np.testing.assert_allclose(predictor.predict_scan(scan, progress=lambda f: None).probs, quiet.probs, atol=1e-6)


def test_tta_is_chosen_per_call_and_never_changes_the_config() -> None:
    """One Predictor serves every TTA mode: ``predict_scan(scan, tta=...)`` runs that mode's passes, None runs the
    bundle's, and the config (shared by concurrent callers) is never touched."""
    cfg = tiny_config("inference.tta=none")
    before = cfg.model_dump()
    predictor = Predictor([SymmetricConv(symmetric=False)], cfg, device="cpu")
    scan = Scan(np.random.default_rng(2).integers(0, 256, (40, 48), dtype=np.uint8), Geometry.identity((40, 48)))
    passes: dict[str, list[float]] = {}
    probs = {}
    for mode in (None, "flips", "multicrop", "none"):
        seen: list[float] = []
        probs[mode] = predictor.predict_scan(scan, tta=mode, progress=seen.append).probs
        passes[str(mode)] = seen
    assert {m: len(s) for m, s in passes.items()} == {"None": 1, "flips": 4, "multicrop": 5, "none": 1}
    np.testing.assert_array_equal(probs[None], probs["none"])
    assert np.abs(probs["flips"] - probs["none"]).max() > 1e-4  # an asymmetric model: the flips really ran
    assert cfg.model_dump() == before and predictor.cfg is cfg
    flips_default = Predictor([SymmetricConv(symmetric=False)], tiny_config("inference.tta=flips"), device="cpu")
    np.testing.assert_allclose(flips_default.predict_scan(scan).probs, probs["flips"], atol=1e-6)
    with pytest.raises(ValueError, match="unknown TTA mode 'sideways'"):
        predictor.predict_scan(scan, tta="sideways")


def test_backend_is_a_predictor_option_not_a_config_change() -> None:
    cfg = tiny_config()
    compiled = Predictor([Pointwise()], cfg, device="cpu", backend="compile")
    assert compiled.backend == "compile" and cfg.inference.backend == "auto"
    assert Predictor([Pointwise()], cfg, device="cpu").backend == "onnxruntime"  # auto on a CPU
    assert Predictor([Pointwise()], tiny_config("inference.backend=compile"), device="cpu").backend == "compile"


def test_local_and_remote_predictors_share_one_interface() -> None:
    """``ScanPredictor``: what the CLI, app and service call, with the same keyword-only per-call options."""
    import inspect

    from medseg.inference.protocol import ScanPredictor
    from medseg.service.client import RemotePredictor

    assert isinstance(Predictor([Pointwise()], tiny_config(), device="cpu"), ScanPredictor)
    want = inspect.signature(ScanPredictor.predict_scan).parameters
    for cls in (Predictor, RemotePredictor):
        got = inspect.signature(cls.predict_scan).parameters
        assert list(got)[: len(want)] == list(want), cls
        assert all(got[k].kind == want[k].kind and got[k].default == want[k].default for k in want), cls
        # Anything a face adds (the service's run_anyway) is keyword-only with a default: callers of the
        # protocol never need it.
        extra = [got[k] for k in list(got)[len(want):]]
        assert all(p.kind == p.KEYWORD_ONLY and p.default is not p.empty for p in extra), cls
    assert {"name", "weights_hash", "labels"} <= set(ScanPredictor.__annotations__)
    assert isinstance(ScanPredictor.__dict__["device"], property)


def test_progress_moves_tile_by_tile_on_a_large_image() -> None:
    """Issue 16: one 2D pass over many tiles reported nothing until it ended."""
    cfg = tiny_config()  # 64 x 64 tiles, batch 4
    predictor = Predictor([Pointwise()], cfg, device="cpu")
    scan = Scan(np.random.default_rng(2).random((300, 300), dtype=np.float32), Geometry.identity((300, 300)))
    seen: list[float] = []
    predictor.predict_scan(scan, progress=seen.append)
    assert len(seen) > 5 and seen == sorted(seen) and seen[-1] == 1.0 and 0 < seen[0] < 0.5
