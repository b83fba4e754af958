"""Accept / correct / reject a result with a note, saved into the server's review dataset (``medseg.review``)."""

from __future__ import annotations

import streamlit as st

from app.escape import markdown_text
from app.results import Result
from app.settings import load_settings
from medseg.errors import MedsegError
from medseg.review import save_review

REVIEWER = "_reviewer"  # who is signed in (set by the page; "anonymous" without sign-in)


def review_panel(result: Result) -> None:
    st.markdown("**Review**")
    settings = load_settings(st.get_option("server.maxUploadSize"))
    note = st.text_input("Note (optional)", key="review_note", max_chars=500,
                         placeholder="e.g. missed the lower pole", help="Saved with the verdict; no patient names.")
    accept, correct, reject = st.columns(3)
    edited = result.was_edited
    verdict = None
    if accept.button("Accept", key="review_accept", icon=":material/check:", width="stretch",
                     disabled=edited, help="The model's mask is right as it is."):
        verdict = "accepted"
    if correct.button("Save correction", key="review_correct", icon=":material/edit:", width="stretch",
                      disabled=not edited, help="Save your edited mask (switch on Edit mask to correct it)."):
        verdict = "corrected"
    if reject.button("Reject", key="review_reject", icon=":material/close:", width="stretch",
                     help="The result is unusable; recorded, not used for training."):
        verdict = "rejected"
    if verdict is not None and _save(result, verdict, note, settings):
        st.rerun(scope="app")  # the sidebar's fine-tune button counts the reviews: redraw it too
    saved = result.review
    if saved is not None:
        st.success(f"Saved as **{saved.verdict}** (case {markdown_text(saved.case)}"
                   + (f", Dice to the model's mask {saved.dice_model_vs_final}" if saved.dice_model_vs_final else "")
                   + ").", icon=":material/task_alt:")


def _save(result: Result, verdict: str, note: str, settings) -> bool:
    info = result.info
    try:
        result.review = save_review(
            settings.review_dir, scan=result.scan, model_mask=result.model_mask, final_mask=result.mask,
            verdict=verdict, note=note, who=st.session_state.get(REVIEWER), model=info.name,
            model_version=info.version, weights_hash=info.weights_hash, input_sha256=result.provenance.input_sha256,
            label_map=info.label_map, num_classes=max(info.labels) + 1, series_uid=result.key[1],
        )
    except (OSError, MedsegError, ValueError) as e:
        st.error(f"The review could not be saved ({type(e).__name__}): ask your administrator to check "
                 "MEDSEG_REVIEW_DIR.", icon=":material/error:")
        return False
    return True
