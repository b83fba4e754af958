"""Run the service with uvicorn: one process, one model, one inference worker thread.

More throughput comes from more processes (one per GPU) or replicas behind a proxy, not from uvicorn
``--workers`` inside one container: each worker would load its own model copy onto the same GPU.
``app_from_env`` lets ``uvicorn --factory medseg.service.server:app_from_env`` start it from ``MEDSEG_BUNDLE``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from medseg.errors import BundleError
from medseg.service.settings import ServiceSettings

log = logging.getLogger("medseg.service")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def with_default_hosts(settings: ServiceSettings, host: str) -> ServiceSettings:
    """Without ``trusted_hosts``: loopback names when listening on loopback, else any Host (a warning says how
    to close it: behind a proxy or a DNS name, set MEDSEG_SERVICE_TRUSTED_HOSTS)."""
    if settings.trusted_hosts is not None or _is_loopback(host):
        return settings
    log.warning("listening on %s and accepting any Host header; set MEDSEG_SERVICE_TRUSTED_HOSTS to the names "
                "clients use (e.g. gpu-1,gpu-1.example.org) to refuse DNS-rebinding pages", host)
    return dataclasses.replace(settings, trusted_hosts=("*",))


def app_from_env():
    """The app for ``MEDSEG_BUNDLE`` (bundle folder or .zip) with ``MEDSEG_SERVICE_*`` settings."""
    from medseg.service.app import create_app

    bundle = os.environ.get("MEDSEG_BUNDLE")
    if not bundle:
        raise BundleError("set MEDSEG_BUNDLE to the model bundle the service should load")
    return create_app(Path(bundle), ServiceSettings.from_env())


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's HTTP/1.1 protocol with a time limit on request headers.

    uvicorn waits for a request line and headers without any limit (its keep-alive timeout runs only between
    requests and stops at the first byte), so a client sending half its headers holds a connection forever. The
    limit runs from the connection (or the end of the previous request) until the headers are complete; the
    body has its own limits (``RequestBodyLimits``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still waiting for (the rest of) a request's headers
                self._arm_header_timer()
            else:
                self._cancel_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """What ``serve`` adds to uvicorn's defaults (tests start their servers with the same): headers are timed."""
    return {"http": header_timeout_protocol(settings.read_timeout_s), "timeout_graceful_shutdown": 10}


def serve(bundle: Path, host: str = "127.0.0.1", port: int = 8000, settings: ServiceSettings | None = None,
          log_level: str = "info") -> None:
    """Load ``bundle`` once and serve it until interrupted."""
    import uvicorn

    from medseg.service.app import create_app

    settings = with_default_hosts(settings or ServiceSettings.from_env(), host)
    app = create_app(bundle, settings)
    # The body limits live in the app, the header time limit in the protocol. Access logs show paths with job
    # ids only (uploads are multipart bodies, never in the URL), so they stay on.
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(settings))
