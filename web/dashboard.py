"""GET /: the live dashboard, a static page (web/static/) that polls the JSON API.

Every asset is served by the worker itself: a cluster may have no internet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from web.common import ApiError, ApiView, endpoint

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html", ".css": "text/css",
                 ".js": "text/javascript", ".png": "image/png"}


def static_file(name: str) -> tuple[bytes, str]:
    """One file of web/static and its content type; 404 for anything else."""
    try:
        path = (STATIC / name).resolve()
    except (OSError, ValueError):  # a name no file system takes (a NUL byte, too long)
        path = STATIC
    if path.parent != STATIC or path.suffix not in CONTENT_TYPES or not path.is_file():
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return path.read_bytes(), CONTENT_TYPES[path.suffix]


@endpoint("/", "The live dashboard (HTML)")
class Dashboard(ApiView):
    async def get(self, request: Any) -> Any:
        body, content_type = static_file("dashboard.html")
        return self.web.bytes(body, content_type=content_type)


@endpoint("/static/{name}", "The dashboard's own assets")
class Static(ApiView):
    async def get(self, request: Any, name: str) -> Any:
        body, content_type = static_file(name)
        return self.web.bytes(body, content_type=content_type, headers={"Cache-Control": "no-cache"})
