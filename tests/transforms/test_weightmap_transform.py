from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medseg.transforms.dictionary import UNetWeightMap, UNetWeightMapd
from medseg.transforms.weightmap import compute_weight_map, objects_from_mask, objects_from_membranes


def touching_squares() -> tuple[np.ndarray, np.ndarray]:
    """A mask whose two squares touch (one component) and the instance map that tells them apart."""
    instances = np.zeros((32, 40), dtype=np.int32)
    instances[8:24, 4:20] = 1
    instances[8:24, 20:36] = 2
    return (instances > 0).astype(np.int64), instances


def test_mapd_on_a_dict_with_an_instance_map() -> None:
    mask, instances = touching_squares()
    data = {"image": np.zeros((1, 32, 40), np.float32), "label": mask[None], "inst": instances[None]}
    out = UNetWeightMapd(keys="label", objects_key="inst", w0=10.0, sigma=5.0)(data)
    assert set(out) == {"image", "label", "inst", "weight"}
    assert out["weight"].shape == (1, 32, 40) and out["weight"].dtype == np.float32
    np.testing.assert_array_equal(out["weight"][0], compute_weight_map(instances, labels=mask))
    assert data.keys() == {"image", "label", "inst"}  # input dict untouched


def test_components_mode_sees_touching_squares_as_one_object() -> None:
    mask, instances = touching_squares()
    with_instances = UNetWeightMap(objects="instances")(mask[None], instances[None])
    components = UNetWeightMap(objects="components")(mask[None])
    # One component -> no second object -> no border term anywhere.
    np.testing.assert_array_equal(components[0], compute_weight_map(objects_from_mask(mask)))
    assert components.max() < with_instances.max()


def test_membrane_mode_and_custom_weight_key() -> None:
    mask = np.ones((21, 21), dtype=np.int64)
    mask[10, :] = 0
    out = UNetWeightMapd(keys="seg", objects="membrane", weight_key="w", class_weights=[1.0, 1.0])(
        {"seg": mask[None]}
    )
    expected = compute_weight_map(objects_from_membranes(mask), class_weights=[1.0, 1.0], labels=mask)
    np.testing.assert_array_equal(out["w"][0], expected)
    assert out["w"][0, 10].min() > 5  # the membrane between the two cells


def test_tensor_in_tensor_out_and_spacing_from_metatensor() -> None:
    mask, instances = touching_squares()
    affine = torch.diag(torch.tensor([0.5, 0.25, 1.0, 1.0], dtype=torch.float64))
    label = MetaTensor(torch.from_numpy(mask[None]).float(), affine=affine)  # float, as loaders give
    inst = MetaTensor(torch.from_numpy(instances[None]), affine=affine)
    t = Compose([UNetWeightMapd("label", objects_key="inst", sigma=2.0, sigma_in_mm=True)])
    out = t({"label": label, "inst": inst})
    weight = out["weight"]
    assert isinstance(weight, MetaTensor) and weight.dtype == torch.float32
    torch.testing.assert_close(weight.affine, affine)
    expected = compute_weight_map(instances, sigma=2.0, spacing=(0.5, 0.25), labels=mask)
    np.testing.assert_allclose(weight[0].numpy(), expected, rtol=0, atol=1e-6)


def test_bad_setups_raise() -> None:
    mask, _ = touching_squares()
    with pytest.raises(ValueError, match="objects_key"):
        UNetWeightMapd(keys="label", objects="instances")
    with pytest.raises(ValueError, match="channel-first"):
        UNetWeightMap()(mask)  # missing channel axis
    with pytest.raises(ValueError, match="MetaTensor"):
        UNetWeightMap(sigma_in_mm=True)(mask[None])
