"""The worklist on the page: the user's cases with their status, the PACS browser that adds to it, opening a
case (its series becomes the scan the page segments), and sending a reviewed case's SEG back to its PACS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pandas as pd
import streamlit as st

from app.escape import markdown_text
from app.pacs import pacs_browser, retrieve_case, send_seg
from app.settings import AppSettings
from app.uploads import UploadedBytes
from app.worklist import Case, CaseStatus, Worklist, status_after_result
from medseg.errors import MedsegError

OPEN_CASE = "_worklist_open"  # the open case's id
CASE_BYTES = "_worklist_bytes"  # case id -> UploadedBytes (this session only)
T = TypeVar("T")


def _bytes_cache() -> dict[str, UploadedBytes]:
    return st.session_state.setdefault(CASE_BYTES, {})


def worklist_panel(settings: AppSettings, user: str | None, upload: UploadedBytes | None
                   ) -> tuple[Worklist, Case | None, UploadedBytes | None]:
    """Draw the worklist; returns it, the open case and that case's images (None, None: no case open)."""
    worklist = Worklist.load(settings.worklist_dir, user)
    open_id = st.session_state.get(OPEN_CASE)
    counts = ", ".join(f"{n} {s}" for s, n in worklist.counts().items() if n) or "empty"
    with st.expander(f"Worklist ({counts})", expanded=open_id is None, icon=":material/list_alt:"):
        cases_tab, pacs_tab = st.tabs(["My cases", "Find in PACS"])
        with pacs_tab:  # drawn first: a series added there is listed in "My cases" in the same run
            pacs_browser(settings, worklist)
        with cases_tab:
            _cases(worklist, upload)
    case = worklist.get(st.session_state.get(OPEN_CASE))
    if case is None:
        st.session_state.pop(OPEN_CASE, None)
        return worklist, None, None
    images = _bytes_cache().get(case.case_id)
    if images is None and case.from_pacs:
        try:
            with st.spinner("Retrieving the series from the PACS…"):
                images = retrieve_case(case, settings)
        except MedsegError as e:
            st.error(markdown_text(e), icon=":material/error:")
            st.stop()
        _bytes_cache()[case.case_id] = images
    if images is None:
        st.warning("This upload is no longer in this session: upload it again to reopen it.", icon=":material/warning:")
        return worklist, None, None
    left, right = st.columns([4, 1], vertical_alignment="center")
    left.info(f"Case: **{markdown_text(case.label)}** · {case.status}", icon=":material/folder_open:")
    if right.button("Close case", key="worklist_close", icon=":material/close:"):
        st.session_state.pop(OPEN_CASE, None)
        st.rerun()
    return worklist, case, images


def _cases(worklist: Worklist, upload: UploadedBytes | None) -> None:
    if upload is not None and not any(c.upload_sha256 == upload.sha256 for c in worklist.cases):
        if st.button("Add the uploaded scan to my worklist", key="worklist_add_upload", icon=":material/playlist_add:"):
            case = worklist.add_upload(upload.sha256, f"upload · {len(upload.files)} file(s) · {upload.short_hash}")
            _bytes_cache()[case.case_id] = upload
    if not worklist.cases:
        st.caption("No cases yet: add series from the PACS, or upload a scan and add it.")
        return
    table = pd.DataFrame([{"Case": c.label, "Status": str(c.status), "From": c.endpoint or "upload",
                           "Added": c.added.replace("T", " ")[:16]} for c in worklist.cases])
    st.dataframe(table, hide_index=True, width="stretch", key="worklist_table")
    ids = [c.case_id for c in worklist.cases]
    pick, open_col, remove_col = st.columns([4, 1, 1], vertical_alignment="bottom")
    chosen = pick.selectbox("Case", ids, key="worklist_case",
                            format_func=lambda i: worklist.get(i).label)  # stable: the status is in the table
    if open_col.button("Open", key="worklist_open", icon=":material/folder_open:", disabled=chosen is None):
        st.session_state[OPEN_CASE] = chosen
    if remove_col.button("Remove", key="worklist_remove", icon=":material/delete:", disabled=chosen is None):
        worklist.remove(chosen)
        _bytes_cache().pop(chosen, None)
        if st.session_state.get(OPEN_CASE) == chosen:
            st.session_state.pop(OPEN_CASE, None)
        st.rerun()


def segment_case(worklist: Worklist, case: Case | None, segment: Callable[[], T]) -> T:
    """Run ``segment`` (the page's segmentation, cached or not) with the case shown as running meanwhile, then
    record done/reviewed; a failure puts the case back as it was."""
    if case is None:
        return segment()
    before = case.status
    if before == CaseStatus.queued:
        worklist.update(case, status=CaseStatus.running)
    try:
        result = segment()
    except BaseException:
        worklist.update(case, status=before)
        raise
    note_result(worklist, case, result)
    return result


def note_result(worklist: Worklist, case: Case | None, result: Any) -> None:
    if case is None:
        return
    verdict = getattr(result.review, "verdict", None)
    status = status_after_result(case, verdict)
    if (status, verdict) != (case.status, case.verdict):
        worklist.update(case, status=status, verdict=verdict)


def send_panel(worklist: Worklist, case: Case | None, result: Any, settings: AppSettings) -> None:
    """For a PACS case: after review and the user's confirmation, store the SEG back on its PACS."""
    if case is None or not case.from_pacs:
        return
    note_result(worklist, case, result)  # a review saved in the result view since the page was drawn
    st.subheader("Send to PACS")
    if result.review is None:
        st.info("Review the result first (Accept, or correct it and Save correction); then its DICOM SEG can be "
                "sent to the PACS.", icon=":material/info:")
        return
    if result.review.verdict == "rejected":
        st.warning("This result was rejected: nothing to send.", icon=":material/block:")
        return
    confirm = st.checkbox(f"I reviewed this segmentation; store it as a DICOM SEG on {markdown_text(case.endpoint)}",
                          key=f"send_confirm_{case.case_id}")
    if st.button("Send SEG to PACS", key="worklist_send", icon=":material/send:", disabled=not confirm):
        try:
            with st.spinner("Storing the SEG…"):
                sop_uid = send_seg(case, result, settings)
        except MedsegError as e:
            st.error(markdown_text(e), icon=":material/error:")
            return
        worklist.update(case, status=CaseStatus.sent, seg_sop_uid=sop_uid)
    if case.status == CaseStatus.sent:
        st.success(f"Sent to {markdown_text(case.endpoint)}: the SEG references the source series "
                   "(sending again replaces it).", icon=":material/task_alt:")
