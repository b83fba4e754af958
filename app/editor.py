"""The editing view: the result's slice in a small canvas component of our own (``app/components/mask_editor.*``,
plain JS served with the page, nothing fetched), a toolbar, undo/redo, and mouse-wheel / keyboard slice moves.

The browser only reports what the user did, in slice pixels; ``app.editing`` applies it to the result's editable
copy of the mask (in a widget callback, so the picture drawn next already shows the edit). The model's own mask is
kept unchanged beside it, for the review's Dice between the two.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
from PIL import Image

from app import display, editing
from app.display import Plane
from app.escape import markdown_text
from app.measure import measurement_table
from app.results import Result

_ASSETS = Path(__file__).with_name("components")
_COMPONENT = st.components.v2.component(
    "medseg_mask_editor",
    js=(_ASSETS / "mask_editor.js").read_text(encoding="utf-8"),
    css=(_ASSETS / "mask_editor.css").read_text(encoding="utf-8"),
)
EDITOR_KEY = "mask_editor"
TOOLS = {"View": "view", "Brush": "brush", "Eraser": "eraser", "Fill hole": "fill", "Delete region": "delete",
         "Click prompt": "prompt"}
_VIEW = "_edit_view"  # what the editor shows now (read by the edit callback)
_MESSAGE = "_edit_message"


@dataclass(frozen=True)
class EditorView:
    plane: Plane
    index: int
    count: int
    slider_key: str
    tool: str
    label: int
    radius: float
    prompt_remove: bool


def _data_url(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def toolbar(result: Result, suffix: str, colors: dict[int, str]) -> tuple[str, int, float, bool]:
    """(tool, label, brush radius in slice pixels, prompt removes) from the editing controls."""
    labels = [i for i in colors]
    # Wrapped pills: the six tools do not fit one row of the side column at 1440 px (unwrapped they scrolled
    # sideways and hid "Click prompt"); separate pills read better over two rows than a broken segmented bar.
    tool = TOOLS[st.pills("Tool", list(TOOLS), default="Brush", required=True, key=f"tool_{suffix}", wrap=True)]
    label = st.selectbox("Label", labels, key=f"edit_label_{suffix}",
                         format_func=lambda i: result.info.labels.get(i, {}).get("name", f"label {i}"))
    radius = st.slider("Brush size (px)", 1, 40, 4, key=f"brush_{suffix}",
                       help="Radius in the scan's pixels.") if tool in ("brush", "eraser") else 4
    prompt_remove = False
    if tool == "prompt":
        prompt_remove = st.segmented_control(
            "Click adds or removes", ["Add region", "Remove region"], default="Add region", required=True,
            key=f"prompt_mode_{suffix}", help="Shift-click does the other one.", wrap=True) == "Remove region"
    undo_col, redo_col = st.columns(2)
    history = result.history
    undo_col.button("Undo", key="edit_undo", icon=":material/undo:", disabled=not history.done,
                    on_click=_undo_redo, args=(True,), width="stretch")
    redo_col.button("Redo", key="edit_redo", icon=":material/redo:", disabled=not history.undone,
                    on_click=_undo_redo, args=(False,), width="stretch")
    message = st.session_state.pop(_MESSAGE, "")
    if message:
        st.warning(markdown_text(message), icon=":material/info:")
    return tool, int(label), float(radius), prompt_remove


def show(result: Result, view: EditorView, picture: np.ndarray) -> None:
    """The canvas with ``picture`` (the composed slice at screen size)."""
    st.session_state[_VIEW] = view
    rows, cols = display.take_plane(result.mask, view.plane, view.index).shape if result.scan.is_volume \
        else result.mask.shape
    color = display.legend_colors(result.info.labels).get(view.label, "#ffffff")
    _COMPONENT(
        key=EDITOR_KEY, on_edit_change=_apply_event, width="content",
        data={"image": _data_url(picture), "rows": int(rows), "cols": int(cols), "tool": view.tool,
              "radius": view.radius, "color": color, "volume": bool(result.scan.is_volume),
              "label": f"{view.plane.value} slice {view.index + 1} of {view.count}, tool {view.tool}"},
    )


def _slice(result: Result, plane: Plane, index: int) -> np.ndarray:
    """The editable slice (a view into the edited volume: writes go through)."""
    mask = result.edited_mask()
    return display.take_plane(mask, plane, index) if result.scan.is_volume else mask


def _probability(result: Result, plane: Plane, index: int, label: int) -> np.ndarray:
    probs = result.prediction.probs[label]
    return display.take_plane(probs, plane, index) if result.scan.is_volume else probs


def _event() -> dict[str, Any] | None:
    state = st.session_state.get(EDITOR_KEY)
    value = state.get("edit") if hasattr(state, "get") else getattr(state, "edit", None)
    return value if isinstance(value, dict) else None


def apply_event(result: Result, view: EditorView, event: dict[str, Any]) -> str:
    """Apply one event from the canvas to ``result``; returns "" or why nothing was changed (shown to the user)."""
    kind = event.get("kind")
    if kind == "slice":
        step = int(np.sign(event.get("delta", 0)) * max(1, abs(int(event.get("delta", 0)))))
        st.session_state[view.slider_key] = int(np.clip(view.index + 1 + step, 1, view.count))
        return ""
    current = _slice(result, view.plane, view.index)
    before = current.copy()
    try:
        if kind == "stroke" and view.tool in ("brush", "eraser"):
            points = [(float(x), float(y)) for x, y in event.get("points", [])][:5000]
            edit = editing.erase if (view.tool == "eraser") != bool(event.get("shift")) else editing.brush
            after = edit(before, points, view.radius, view.label)
        elif kind == "click":
            x, y = float(event.get("x", -1)), float(event.get("y", -1))
            if view.tool == "fill":
                after = editing.fill_hole(before, x, y, view.label)
            elif view.tool == "delete":
                after = editing.delete_component(before, x, y)
            elif view.tool == "prompt":
                remove = view.prompt_remove != bool(event.get("shift"))
                after = editing.prompt_remove(before, x, y) if remove else editing.prompt_add(
                    before, _probability(result, view.plane, view.index, view.label), x, y, view.label)
            else:
                return ""
        else:
            return ""
    except editing.EditRefused as e:
        return str(e)
    if result.history.record((view.plane.value, view.index), before, after):
        current[...] = after
        _changed(result)
    return ""


def _changed(result: Result) -> None:
    result.forget_files()  # downloads are made again from the edited mask
    result.table = measurement_table(result.scan, result.mask, result.info.labels, result.truth)


def _apply_event() -> None:
    result: Result | None = st.session_state.get("result")
    view: EditorView | None = st.session_state.get(_VIEW)
    event = _event()
    if result is None or view is None or event is None:
        return
    message = apply_event(result, view, event)
    if message:
        st.session_state[_MESSAGE] = message


def _undo_redo(undo: bool) -> None:
    result: Result | None = st.session_state.get("result")
    if result is None:
        return
    edit = result.history.undo() if undo else result.history.redo()
    if edit is None:
        return
    plane, index = Plane(edit.where[0]), edit.where[1]
    _slice(result, plane, index)[...] = edit.before if undo else edit.after
    _changed(result)
