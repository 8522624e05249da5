"""``detfit serve``: check the extra is installed, load the model, run uvicorn. SIGTERM stops
taking connections, lets the requests in flight finish (up to ``drain_s``), then exits 0."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Callable

from detfit.errors import DetfitError
from detfit.serve.settings import SETTINGS_ENV, ServeSettings

# python-multipart's module (named multipart before 0.0.13), which parses uploaded forms
EXTRA_MODULES = ("fastapi", "uvicorn", "python_multipart|multipart", "prometheus_client")


def require_extra() -> None:
    """One line naming the extra when a module of it is missing."""
    for names in EXTRA_MODULES:
        if not any(importlib.util.find_spec(n) for n in names.split("|")):
            name = names.split("|")[0]
            raise DetfitError(
                f"detfit serve needs the serve extra ({name} is missing): "
                "pip install 'detfit[serve]'"
            )


def serve(settings: ServeSettings, log: Callable[[str], None] = print) -> None:
    require_extra()
    import uvicorn

    from detfit.serve.app import app_from_environment, create_app

    common = dict(
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=settings.drain_s,
        log_level="info",
        access_log=False,
    )
    # a bad MODEL is one line here, before anything listens; with --workers N each worker
    # process loads its own copy (the factory reads the settings from the environment) and
    # this one only checks that the model loads
    app = create_app(settings)
    where = f"http://{settings.host}:{settings.port}/"
    log(f"detfit serve {settings.model} on {where} ({settings.workers} worker(s)); Ctrl-C stops")
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: this one
    # makes that a normal exit (0) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    if settings.workers == 1:
        uvicorn.Server(uvicorn.Config(app, **common)).run()
        return
    del app
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    factory = f"{app_from_environment.__module__}:{app_from_environment.__name__}"
    uvicorn.run(factory, factory=True, workers=settings.workers, **common)
