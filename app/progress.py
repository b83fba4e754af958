"""Progress of a segmentation: a bar per slice/tile with elapsed time and an estimate, and a Cancel button.

Cancel needs no thread of its own: a click makes Streamlit stop the running script at its next ``st`` call, and the
progress callback makes one after every slice or tile, so computing stops there; the button's callback then marks
this run as cancelled for the next script run. The same holds when the session ends (tab closed): Streamlit stops
the script at the next progress update instead of finishing a model run nobody will see.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import streamlit as st

CANCELLED = "_cancelled_run"


def elapsed_text(fraction: float, seconds: float) -> str:
    """``37 % · 12 s elapsed · about 20 s left`` (no estimate before the first update)."""
    text = f"{fraction:.0%} · {seconds:.0f} s elapsed"
    if 0.0 < fraction < 1.0:
        text += f" · about {seconds * (1 - fraction) / fraction:.0f} s left"
    return text


def was_cancelled(run_key: tuple) -> bool:
    return st.session_state.get(CANCELLED) == run_key


def show_cancelled(run_key: tuple) -> None:
    """What the page shows instead of a result after Cancel; stops the page until "Segment again"."""
    st.info("Segmentation cancelled.", icon=":material/cancel:")
    st.button("Segment again", key="segment_again", icon=":material/play_arrow:",
              on_click=st.session_state.pop, args=(CANCELLED, None))
    st.stop()


class ProgressDisplay:
    """The bar and the Cancel button for one model run; ``update(fraction)`` is the predictor's callback."""

    def __init__(self, run_key: tuple) -> None:
        self.started = time.perf_counter()
        self.box = st.empty()
        with self.box.container():
            self.bar = st.progress(0.0, text="Segmenting… starting")
            st.button("Cancel", key="cancel_segmentation", icon=":material/stop:",
                      on_click=st.session_state.__setitem__, args=(CANCELLED, run_key))

    def update(self, fraction: float) -> None:
        self.bar.progress(fraction, text="Segmenting… " + elapsed_text(fraction, time.perf_counter() - self.started))

    @property
    def callback(self) -> Callable[[float], None]:
        return self.update

    def close(self) -> None:
        self.box.empty()
