"""The web page: GET / and GET /ui serve one static page (service/ui/), plus its script and
style sheet. Plain files from the package, no CDN, so it works offline.

The page is public (it holds no data); the JSON calls it makes carry the API key that the
person types in, so API_KEY protects the data exactly as for any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
# The page refers to its assets and to the API with relative URLs ("ui/app.js", "recommend"),
# which resolve the same from "/" and from "/ui", and behind a proxy that adds a path prefix.
# Always revalidate: a new service version must not run with an old cached script.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


def _page() -> FileResponse:
    # The page runs only its own script and style sheet and talks only to this service.
    csp = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return FileResponse(UI_DIR / "index.html", media_type="text/html",
                        headers={**HEADERS, "Content-Security-Policy": csp})


@router.get("/")
async def root() -> FileResponse:
    return _page()


@router.get("/ui")
async def page() -> FileResponse:
    return _page()


@router.get("/ui/app.js")
async def script() -> FileResponse:
    return FileResponse(UI_DIR / "app.js", media_type="text/javascript", headers=HEADERS)


@router.get("/ui/style.css")
async def style() -> FileResponse:
    return FileResponse(UI_DIR / "style.css", media_type="text/css", headers=HEADERS)
