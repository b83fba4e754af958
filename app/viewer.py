"""The result view: image with mask, legend and display controls, measurements, downloads.

It runs as an ``st.fragment``: moving the slice slider or changing the window reruns only this function, and it
reads the finished ``Result`` from ``st.session_state`` — it never calls a model.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import display, editor
from app.display import MANUAL_WINDOW, Plane
from app.escape import html_text, markdown_text
from app.exports import (
    dicom_seg_available,
    dicom_seg_bytes,
    mask_bytes,
    mask_suffix,
    overlay_png_bytes,
)
from app.measure import physical_units, size_column
from app.results import Result
from app.review_panel import review_panel

SWATCH = (
    '<div title="{name}" style="width:1rem;height:1rem;border-radius:.2rem;background:{color};'
    'border:1px solid rgba(0,0,0,.3)"></div>'
)


def swatch_html(name: str, color: str) -> str:
    """One legend swatch. ``name`` comes from a bundle or the service: escaped; ``color`` is a ``#rrggbb``
    from ``display.legend_colors`` (escaped too, so nothing else can ever reach the style attribute)."""
    return SWATCH.format(name=html_text(name), color=html_text(color))


def _legend(result: Result, colors: dict[int, str], suffix: str) -> set[int]:
    """Colour legend with a visibility switch per label; returns the labels to draw."""
    st.markdown("**Labels**")
    visible = set()
    for index, color in colors.items():
        name = result.info.labels.get(index, {}).get("name", f"label {index}")
        swatch, switch = st.columns([1, 14], vertical_alignment="center", gap="small")
        swatch.html(swatch_html(name, color))
        if switch.checkbox(markdown_text(name), value=True, key=f"show_label_{index}_{suffix}"):
            visible.add(index)
    return visible


def _window(result: Result, suffix: str) -> tuple[float, float] | None:
    scan = result.scan
    if not display.has_intensity_window(scan):
        return None
    options = display.window_options(scan)
    choice = st.selectbox(
        "Window / level", options, index=options.index(display.default_window_option(scan)),
        format_func=lambda option: display.window_label(option, scan), key=f"window_{suffix}",
        help="Width / level in the scan's units (HU for CT).",
    )
    if result.auto_window is None:
        result.auto_window = display.volume_window(scan)  # once per result, not on every slider move
    manual = None
    if choice == MANUAL_WINDOW:
        width_col, level_col = st.columns(2)
        width = width_col.number_input("Width", min_value=1e-3, value=result.auto_window[0], key=f"ww_{suffix}")
        level = level_col.number_input("Level", value=result.auto_window[1], key=f"wl_{suffix}")
        manual = (float(width), float(level))
    if choice == display.AUTO_WINDOW and scan.is_volume:
        return result.auto_window
    return display.window_for(choice, scan, manual)


def _render(result: Result, plane: Plane, index: int, **kw) -> tuple[np.ndarray, np.ndarray | None]:
    """(model view, ground-truth view or None), resized to the slice's physical aspect ratio."""
    scan, pred = result.scan, result.prediction
    volume = scan.is_volume
    image = display.take_plane(scan.array, plane, index) if volume else scan.array
    mask = display.take_plane(result.mask, plane, index) if volume else result.mask
    uncertainty = getattr(pred, "uncertainty", None) if kw.pop("show_uncertainty") else None
    if uncertainty is not None and volume:
        uncertainty = display.take_plane(uncertainty, plane, index)
    truth_mode = kw.pop("truth_mode")
    truth = None
    if result.truth is not None and truth_mode:
        truth = display.take_plane(result.truth, plane, index) if volume else result.truth
    size = display.display_size(mask.shape, display.pixel_spacing(scan, plane))
    model_view = display.compose(
        image, mask, uncertainty=uncertainty, truth_outline=truth if truth_mode == "Outline" else None, **kw
    )
    truth_view = None
    if truth is not None and truth_mode == "Side by side":
        truth_view = display.to_screen(display.compose(image, truth, **kw), size)
    labels = display.orientation_labels(scan, plane)
    if truth_view is not None:
        truth_view = display.draw_orientation(truth_view, labels)
    return display.draw_orientation(display.to_screen(model_view, size), labels), truth_view


@st.fragment
def results_view() -> None:
    result: Result | None = st.session_state.get("result")
    if result is None:
        return
    scan = result.scan
    suffix = result.provenance.short_hash + result.info.weights_hash[:6]
    colors = display.legend_colors(result.info.labels)

    image_col, side_col = st.columns([3, 2], gap="large")
    with side_col:
        visible = _legend(result, colors, suffix)
        opacity = st.slider("Fill opacity", 0.0, 1.0, 0.45, 0.05, key=f"opacity_{suffix}")
        window = _window(result, suffix)
        show_uncertainty = st.toggle(
            "Uncertainty overlay", key=f"uncertainty_{suffix}",
            disabled=getattr(result.prediction, "uncertainty", None) is None,
            help="Bright where the model hesitates between labels (normalised entropy); check those areas first.",
        )
        editing_on = st.toggle("Edit mask", key=f"edit_mode_{suffix}",
                               help="Correct the mask: brush, eraser, fill a hole, delete a region, click prompts.")
        if editing_on:
            tool, label, radius, prompt_remove = editor.toolbar(result, suffix, colors)
        truth_mode = None
        if result.truth is not None:
            truth_mode = st.segmented_control(
                "Ground truth", ["Outline", "Side by side"], default="Outline", key=f"truth_mode_{suffix}",
                help="White outline on the model's mask, or the ground truth in its own image beside it.",
            )
            if truth_mode == "Outline":
                st.caption(f"White outline: ground truth ({markdown_text(result.truth_name)})")

    with image_col:
        plane, index, count, slider_key = Plane.axial, 0, 1, ""
        if scan.is_volume:
            # Plane and slice sit above the image so both stay on screen next to it.
            plane_col, slice_col = st.columns([2, 3], vertical_alignment="bottom")
            plane = Plane(plane_col.segmented_control(
                "Plane", [p.value for p in Plane], default=Plane.axial.value, required=True, key=f"plane_{suffix}",
                wrap=True,  # in a narrow column: wrap rather than scroll sideways (Sagittal was cut off at 1440 px)
            ))
            count = display.slice_count(scan, plane)
            slider_key = f"slice_{plane.value}_{suffix}"
            if slider_key not in st.session_state:  # set here, not as a default: the wheel and keys move it too
                st.session_state[slider_key] = display.best_slice(result.mask, plane) + 1
            index = slice_col.slider(
                "Slice", 1, count, key=slider_key,
                help="Starts at the slice with the most segmented voxels. In the editing view the mouse wheel and "
                "the arrow / Page keys move through slices.",
            ) - 1
        model_view, truth_view = _render(
            result, plane, index, colors=colors, alpha=opacity, window=window, visible=visible,
            show_uncertainty=show_uncertainty, truth_mode=truth_mode,
        )
        rows, cols = display.pixel_spacing(scan, plane)
        where = f"{plane.value} slice {index + 1} of {count} · " if scan.is_volume else ""
        pixel = f"pixel {rows:.2f} × {cols:.2f} mm" if physical_units(scan) else "pixel size unknown"
        caption = where + pixel
        if editing_on:
            editor.show(result, editor.EditorView(plane, index, count, slider_key, tool, label, radius, prompt_remove),
                        model_view)
            st.caption(caption)
            if truth_view is not None:
                st.image(truth_view, caption=f"Ground truth · {caption}")
        elif truth_view is None:
            st.image(model_view, caption=caption)
        else:
            left, right = st.columns(2)
            left.image(model_view, caption=f"Model · {caption}")
            right.image(truth_view, caption=f"Ground truth · {caption}")

    with side_col:
        _measurements(result)
        _downloads(result, model_view, f"{plane.value.lower()}{index + 1}" if scan.is_volume else "image")
        review_panel(result)


def _measurements(result: Result) -> None:
    st.markdown("**Measurements**")
    table = result.table
    if table is None or table.empty:
        st.caption("This model has no foreground labels to measure.")
        return
    size_format = "{:.2f}" if result.scan.is_volume else ("{:.1f}" if physical_units(result.scan) else "{:,.0f}")
    formats = {"Pixels": "{:,}", "Voxels": "{:,}", "Dice": "{:.3f}", "HD95 (mm)": "{:.1f}", "HD95 (px)": "{:.1f}"}
    for col in table.columns:
        if col == size_column(result.scan) or col.startswith("Truth "):
            formats[col] = size_format
    # A static table: a few rows read at a glance (and as text, by screen readers and the browser test).
    shown = table.set_index("Label")  # the label names head the rows (st.table always shows the index)
    compare = [c for c in shown.columns if c.startswith("Truth ") or c in ("Dice", "HD95 (mm)", "HD95 (px)")]
    # Size and agreement as two narrow tables: one wide table does not fit beside the image.
    for part in (shown.drop(columns=compare), shown[compare]) if compare else (shown,):
        st.table(part.style.format({c: f for c, f in formats.items() if c in part}, na_rep="–"))
    if not physical_units(result.scan):
        st.caption("The image file states no pixel size, so areas are in pixels.")


def _downloads(result: Result, view: np.ndarray, view_name: str) -> None:
    """Download buttons with their bytes made here, once per result (and mask edit): a callable made on click was
    looked up after a slider move had replaced it ("Deferred file … not found"), so half the clicks did nothing."""
    st.markdown("**Download**")
    scan, prov, info = result.scan, result.provenance, result.info
    suffix = mask_suffix(scan)
    name, data = result.file("mask", lambda: mask_bytes(scan, result.mask, info.label_map, prov))
    st.download_button(
        f"Mask ({'NIfTI' if suffix == '.nii.gz' else 'PNG'})", data=data, file_name=name,
        mime="application/gzip" if suffix == ".nii.gz" else "image/png",
        on_click="ignore", icon=":material/download:", key="download_mask",
    )
    name, data = overlay_png_bytes(view, prov, view_name)
    st.download_button(
        "Overlay (PNG, this view)", data=data, file_name=name,
        mime="image/png", on_click="ignore", icon=":material/download:", key="download_overlay",
    )
    if dicom_seg_available(scan):
        name, data = result.file("dicom_seg", lambda: dicom_seg_bytes(scan, result.mask, info.labels, prov))
        st.download_button(
            "DICOM SEG", data=data, file_name=name,
            mime="application/dicom", on_click="ignore", icon=":material/download:", key="download_seg",
        )
    elif scan.meta.get("format") == "dicom":
        st.caption("DICOM SEG export is not available in this installation.")
