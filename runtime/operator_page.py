"""The operator page at ``/``: one self-contained HTML file, served with a strict CSP.

Why its own module: the page is static (``static/index.html``, no CDN, no external fonts) and
talks to the server only through the public ``/v1/*`` API, so it can be read, tested and
changed without touching the inference path.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from o2n_edge.runtime.http_input import ApiError

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_PATH = STATIC_DIR / "index.html"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"
)


def page_router() -> APIRouter:
    """A router serving the page, read once; a 404 JSON error when it is not installed."""
    page = PAGE_PATH.read_text(encoding="utf-8") if PAGE_PATH.is_file() else None
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def operator_page() -> HTMLResponse:
        if page is None:
            raise ApiError(404, "not found", f"operator page not installed ({PAGE_PATH})")
        return HTMLResponse(
            page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
        )

    return router
