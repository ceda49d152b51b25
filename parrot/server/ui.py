"""The DAG visualizer: the built front end (``ui_static/``, from ``ui/`` in the
repository) served at ``/ui``.

The page is public static files; everything it shows comes from the tenant
API, called by the browser with the key the user types in.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("ui_static")


def mount_ui(app: FastAPI) -> None:
    """Serve the visualizer at ``/ui/`` (``/ui`` redirects there)."""

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui/", StaticFiles(directory=STATIC_DIR, html=True, check_dir=False), name="ui")
