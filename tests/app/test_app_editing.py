"""Mask edits (issue 16 items 7-8) on numpy slices: exact pixels for brush/eraser, holes, components, prompts."""

from __future__ import annotations

import numpy as np
import pytest

from app import editing


def test_brush_paints_a_disc_along_the_stroke_and_eraser_removes_only_its_label() -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[0:3, 0:3] = 2
    painted = editing.brush(mask, [(5, 10), (15, 10)], 2, label=1)
    rows, cols = np.nonzero(painted == 1)
    assert rows.min() == 8 and rows.max() == 12 and cols.min() == 3 and cols.max() == 17  # radius 2 around the line
    assert painted[10, 5:16].all() and painted[0, 0] == 2  # continuous; other labels elsewhere untouched
    erased = editing.erase(painted, [(10, 10)], 1, label=2)
    assert np.array_equal(erased, painted)  # the eraser of label 2 leaves label 1 alone
    erased = editing.erase(painted, [(10, 10)], 1, label=1)
    assert erased[10, 10] == 0 and erased[10, 12] == 1 and (painted != erased).sum() == 5


def test_fill_a_hole_and_refuse_an_open_area() -> None:
    mask = np.zeros((12, 12), np.uint8)
    mask[2:9, 2:9] = 1
    mask[4:7, 4:7] = 0  # a hole
    filled = editing.fill_hole(mask, 5, 5, 1)
    assert filled[2:9, 2:9].all() and filled.sum() == 49
    with pytest.raises(editing.EditRefused, match="not enclosed"):
        editing.fill_hole(mask, 0, 0, 1)


def test_delete_a_connected_component() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[1:3, 1:3] = 1
    mask[6:9, 6:9] = 1
    out = editing.delete_component(mask, 7, 7)
    assert out[6:9, 6:9].sum() == 0 and out[1:3, 1:3].all()
    with pytest.raises(editing.EditRefused):
        editing.delete_component(mask, 5, 5)


def test_click_prompt_grows_the_region_the_probabilities_support() -> None:
    prob = np.zeros((40, 40), np.float32)
    prob[10:20, 10:20] = 0.3  # a structure the model half-saw (below the 0.5 threshold, so not in the mask)
    prob[10:20, 30:35] = 0.3  # another, separate one: not added by a click on the first
    mask = np.zeros((40, 40), np.uint8)
    out = editing.prompt_add(mask, prob, 15, 15, 1)
    assert (out == 1).sum() == 100 and out[10:20, 10:20].all()
    with pytest.raises(editing.EditRefused, match="sees nothing"):
        editing.prompt_add(mask, prob, 25, 25, 1)
    removed = editing.prompt_remove(out, 12, 12)
    assert removed.sum() == 0


def test_history_undoes_and_redoes_exactly() -> None:
    history = editing.EditHistory()
    before = np.zeros((4, 4), np.uint8)
    after = before.copy()
    after[1, 1] = 1
    assert not history.record(("Axial", 0), before, before)
    assert history.record(("Axial", 0), before, after)
    edit = history.undo()
    assert edit is not None and np.array_equal(edit.before, before)
    assert np.array_equal(history.redo().after, after)
    assert history.redo() is None
