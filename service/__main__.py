"""`python -m service`: serve the app with settings from the environment.

WORKERS=1 (default): one process. WORKERS=N: uvicorn's own multi-worker mode, a supervisor
process and N worker processes that share the listening socket; each worker builds its own
app (create_app from the environment), loads the bundle memory-mapped (shared pages, not N
copies) and polls for new versions on its own. Metrics then use prometheus_client's
multiprocess mode: this process points PROMETHEUS_MULTIPROC_DIR at a fresh directory before
the workers start, and /metrics sums the workers' files.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import uvicorn
from pydantic import ValidationError

from service.settings import Settings, get_settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def load_settings() -> Settings:
    """The settings, or exit 2 with the reasons (not a traceback) when they are invalid."""
    try:
        return get_settings()
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: "
                            f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        print(f"service: invalid settings: {reasons}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    settings = load_settings()
    common = dict(host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                  access_log=False)
    if settings.workers == 1:
        from service.app import create_app

        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
        return
    # A fresh directory per run: files left by an earlier run would be summed in. Workers are
    # spawned after this and inherit it; prometheus_client reads it when first imported.
    metrics_dir = tempfile.mkdtemp(prefix="recsys-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        uvicorn.run("service.app:create_app", factory=True, workers=settings.workers,
                    **common)  # type: ignore[arg-type]
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
