"""Uploads the browser refused (over the size limit, a type the app does not read) shown as errors in the page: by
default Streamlit shows the reason only as a tooltip on the file. A small JS component of our own reports the refused
files (``app/components/upload_guard.js``); this module says why, in one line each."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app.escape import markdown_text
from app.settings import AppSettings
from app.uploads import MASK_TYPES, SCAN_TYPES

_GUARD = st.components.v2.component(
    "medseg_upload_guard", js=(Path(__file__).with_name("components") / "upload_guard.js").read_text(encoding="utf-8"),
)


def rejection_reason(label: str, settings: AppSettings) -> str:
    """``"scan.docx, 2.0KB"`` -> one line naming the file and why it was refused."""
    name, _, size = label.rpartition(", ")
    name = name or label
    suffix = name.lower().rsplit(".", 1)[-1] if "." in name else ""
    if suffix not in SCAN_TYPES and suffix not in MASK_TYPES:
        kinds = ", ".join(f".{t}" for t in SCAN_TYPES)
        return f"{name}: not uploaded, this app does not read that type of file (it reads {kinds})."
    return (f"{name}{f' ({size})' if size else ''}: not uploaded, it is larger than this server's limit of "
            f"{settings.upload_mb:,} MB per upload.")


def show_rejected_uploads(settings: AppSettings) -> None:
    state = _GUARD(key="upload_guard", on_rejected_change=lambda: None, default={"rejected": []})
    for label in state.get("rejected") or []:
        st.error(markdown_text(rejection_reason(str(label), settings)), icon=":material/block:")
