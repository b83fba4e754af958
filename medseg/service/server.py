"""Run the service with uvicorn: one process, one model, one inference worker thread.

More throughput comes from more processes (one per GPU) or replicas behind a proxy, not from uvicorn
``--workers`` inside one container: each worker would load its own model copy onto the same GPU.
``app_from_env`` lets ``uvicorn --factory medseg.service.server:app_from_env`` start it from ``MEDSEG_BUNDLE``.
"""

from __future__ import annotations

import os
from pathlib import Path

from medseg.errors import BundleError
from medseg.service.settings import ServiceSettings


def app_from_env():
    """The app for ``MEDSEG_BUNDLE`` (bundle folder or .zip) with ``MEDSEG_SERVICE_*`` settings."""
    from medseg.service.app import create_app

    bundle = os.environ.get("MEDSEG_BUNDLE")
    if not bundle:
        raise BundleError("set MEDSEG_BUNDLE to the model bundle the service should load")
    return create_app(Path(bundle), ServiceSettings.from_env())


def serve(bundle: Path, host: str = "127.0.0.1", port: int = 8000, settings: ServiceSettings | None = None,
          log_level: str = "info") -> None:
    """Load ``bundle`` once and serve it until interrupted."""
    import uvicorn

    from medseg.service.app import create_app

    app = create_app(bundle, settings or ServiceSettings.from_env())
    # The body cap lives in the app; uvicorn's own limits stay at their defaults. Access logs show paths with
    # job ids only (uploads are multipart bodies, never in the URL), so they stay on.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
