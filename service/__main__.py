"""`python -m service`: serve the app with settings from the environment.

SERVER=uvicorn (default) or granian: the same app (create_app from the environment) behind
either ASGI server. WORKERS=1: uvicorn serves in this process; granian always runs its
workers in child processes. WORKERS=N: the server's multi-worker mode, a supervisor and N
worker processes that share the listening socket; each worker builds its own app, loads the
bundle memory-mapped (shared pages, not N copies) and polls for new versions on its own.
Metrics then use prometheus_client's multiprocess mode: this process points
PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers start, and /metrics sums the
workers' files.
"""

from __future__ import annotations

import os

# One BLAS thread per process, read when numpy loads (so before any import that loads it):
# the BLAS products here are small (an exact filtered search, a few interests), and
# OpenBLAS's default of one spinning thread per core in every worker took the cores from
# the other worker. On the 1M bundle at 1% filters, c=16: 267 -> 927 requests/s
# (docs/results.md, "Filters, availability, similar items"). An operator's value stays.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

from pydantic import ValidationError  # noqa: E402

from service.settings import Settings, get_settings  # noqa: E402

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
APP_FACTORY = "service.app:create_app"
# uvicorn's httptools protocol with a cap on request heads (service/http_limits.py), by name:
# each worker process imports it.
LIMITED_HTTP = "service.http_limits:LimitedHttpToolsProtocol"


def server_options(settings: Settings) -> dict[str, Any]:
    """What uvicorn needs beyond the app and the address, the same in every mode (and in the
    tests' live servers): the head limits among them."""
    # No proxy-headers middleware: nothing here reads the client address, and it is one more
    # layer on every request. The access log is the app's own (service/app.py AccessLog).
    return dict(log_level=settings.log_level.lower(), access_log=False, proxy_headers=False,
                http=LIMITED_HTTP, h11_max_incomplete_event_size=settings.max_header_bytes)


def load_settings() -> Settings:
    """The settings, or exit 2 with the reasons (not a traceback) when they are invalid."""
    try:
        return get_settings()
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: "
                            f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        print(f"service: invalid settings: {reasons}", file=sys.stderr)
        raise SystemExit(2) from None


def serve_uvicorn(settings: Settings) -> None:
    import uvicorn

    common = dict(host=settings.host, port=settings.port, **server_options(settings))
    if settings.workers == 1:
        from service.app import create_app

        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
    else:
        uvicorn.run(APP_FACTORY, factory=True, workers=settings.workers,
                    **common)  # type: ignore[arg-type]


def serve_granian(settings: Settings) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings

    level = settings.log_level.lower()
    Granian(APP_FACTORY, factory=True, address=settings.host, port=settings.port,
            interface=Interfaces.ASGI, workers=settings.workers, loop=Loops.uvloop,
            http=HTTPModes.http1, websockets=False, log_access=False,
            # hyper's read buffer bounds a request's head (431 beyond it; at most 100 headers,
            # as service/http_limits.py); hyper's minimum is 8192.
            http1_settings=HTTP1Settings(max_buffer_size=max(8192, settings.max_header_bytes)),
            log_level=level if level in ("critical", "error", "warning", "info", "debug")
            else "info",  # type: ignore[arg-type]
            respawn_failed_workers=True).serve()


def main() -> None:
    settings = load_settings()
    serve = serve_granian if settings.server == "granian" else serve_uvicorn
    if settings.workers == 1:
        serve(settings)
        return
    # A fresh directory per run: files left by an earlier run would be summed in. Workers are
    # spawned after this and inherit it; prometheus_client reads it when first imported.
    metrics_dir = tempfile.mkdtemp(prefix="recsys-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        serve(settings)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
