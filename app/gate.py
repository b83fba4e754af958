"""The model-scan compatibility gate: a scan unlike the model's training data is not segmented until the user says
"run anyway" (issue 16). The checks are ``medseg.inference.compatibility``; this module shows them and remembers the
choice per upload and model, so it is asked once and recorded with the result (and in the audit log)."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from app.escape import markdown_text
from medseg.inference.compatibility import check_scan
from medseg.io import Scan

RUN_ANYWAY = "Run anyway"
REFUSED_BY_SERVICE = "does not fit this model"  # the inference service's 422 text (it checks when the app cannot)


@dataclass(frozen=True)
class Decision:
    """``problems``: how the scan differs from the training data; ``run_anyway``: the user chose to go on."""

    problems: tuple[str, ...] = ()
    run_anyway: bool = False


def choice_key(upload_hash: str, weights_hash: str) -> str:
    return f"run_anyway_{upload_hash[:12]}_{weights_hash[:12]}"


def ask(problems: tuple[str, ...], key: str) -> None:
    """Show why the scan does not fit and the override button; stops the page until it is pressed."""
    lines = "\n".join(f"- {markdown_text(p)}" for p in problems)
    st.error(
        "**This scan does not look like what the model was trained on**, so its result would mean little:\n"
        f"{lines}\n\nChoose another model, or run it anyway knowing that.",
        icon=":material/block:",
    )
    st.button(RUN_ANYWAY, key=f"{key}_button", type="secondary", icon=":material/warning:",
              on_click=st.session_state.__setitem__, args=(key, True))
    st.stop()


def check(scan: Scan, bundle, upload_hash: str, weights_hash: str) -> Decision:
    """The gate for a local model (``bundle``; None for the remote service, which checks itself: see ``ask``)."""
    if bundle is None:
        key = choice_key(upload_hash, weights_hash)
        return Decision((), bool(st.session_state.get(key)))
    fit = check_scan(scan, bundle.preprocessing.get("training_fingerprint"), bundle.config.data)
    if fit.ok:
        return Decision()
    key = choice_key(upload_hash, weights_hash)
    if not st.session_state.get(key):
        ask(fit.problems, key)
    return Decision(fit.problems, True)


def note(decision: Decision) -> None:
    """The warning shown above a result that was run anyway."""
    if decision.run_anyway and decision.problems:
        st.warning("**Run anyway** although this scan does not look like the model's training data: "
                   + markdown_text(" ".join(decision.problems)), icon=":material/warning:")
