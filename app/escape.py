"""Values from a bundle, an upload or the inference service made inert before the page shows them.

Label names, model names and descriptions, file names and DICOM descriptions are text, never markup: a label
named ``<style>.stAlert{display:none}</style>`` must not hide the research-use banner, and one named
``[sign in](http://...)`` must not become a link. ``html_text`` is for ``st.html``; ``markdown_text`` for
everything Streamlit renders as Markdown (``st.markdown``/``st.caption``/``st.error``, widget labels).
"""

from __future__ import annotations

import html
import re

# The characters that make markup anywhere in a line: links and images ([]), HTML and autolinks (<>), code,
# emphasis, tables, strike-through, LaTeX ($), Streamlit's :icon: and :colour[...] (a colon before a non-space,
# which also breaks bare http:// autolinks) and www. autolinks. File names and messages keep their
# underscores, dots and ordinary colons ("scan.nii.gz: truncated") as they are.
_MARKDOWN_INLINE = re.compile(r"[\\`*\[\]<>$|~]|:(?=\S)|(?<=www)\.", re.IGNORECASE)
_BLOCK_START = re.compile(r"^(?:[#>+=-]|\d+(?=[.)]))")


def html_text(value: object) -> str:
    """``value`` as text inside HTML (element content or a quoted attribute)."""
    return html.escape(str(value), quote=True)


def markdown_text(value: object) -> str:
    """``value`` as literal text inside Markdown: one line, every character that would make markup escaped."""
    text = _MARKDOWN_INLINE.sub(lambda m: "\\" + m.group(), " ".join(str(value).split()))
    # A heading, quote, list or rule marker at the start: escaped (for a numbered list, its dot).
    return _BLOCK_START.sub(lambda m: m.group() + "\\" if m.group().isdigit() else "\\" + m.group(), text)
