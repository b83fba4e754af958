"""medseg clinician web app (Streamlit): upload a scan, see and measure the predicted mask, download it.

Start it with ``medseg app [--models DIR] [--port N]``. This file is only the entry point Streamlit runs; the page is
``app.page`` and the work is in ``medseg.io`` / ``medseg.inference`` through the helpers in this package.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run app/streamlit_app.py` puts app/ itself on sys.path, not its parent; an editable checkout needs the
# parent to import the `app` package (an installed medseg has it in site-packages already). Appended: never shadows.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])
if _PACKAGE_PARENT not in sys.path:
    sys.path.append(_PACKAGE_PARENT)

from app.page import main  # noqa: E402

main()
