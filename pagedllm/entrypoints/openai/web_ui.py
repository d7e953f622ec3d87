"""The chat page at `/`: hand-written static files in static/, served as they are.

No build step, no CDN: the page, its script and its style ship inside the package and
talk to this server's own `/v1/chat/completions` and `/v1/models`. The files hold no
secret, so they need no API key (the page asks for the key when the API answers 401).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

STATIC_DIR = Path(__file__).with_name("static")

# route -> (file in static/, media type)
WEB_UI_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/chat.css": ("chat.css", "text/css; charset=utf-8"),
    "/ui/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/ui/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
}
WEB_UI_PATHS = frozenset(WEB_UI_FILES)

# Defence in depth behind the page's rule that model text only ever becomes text nodes:
# no inline script or handler runs, nothing loads from elsewhere, no one frames the page.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new pagedllm version's page is picked up at once
}


def add_web_ui_routes(app: FastAPI) -> None:
    for route, (name, media_type) in WEB_UI_FILES.items():
        content = (STATIC_DIR / name).read_bytes()  # a few KB each; read once, at start-up
        app.add_api_route(route, _static_file(content, media_type), methods=["GET", "HEAD"], include_in_schema=False)


def _static_file(content: bytes, media_type: str):
    async def serve() -> Response:
        return Response(content, media_type=media_type, headers=SECURITY_HEADERS)

    return serve


def page_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the page (a wildcard address is not one to browse to)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
