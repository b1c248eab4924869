"""The web page at `/` and the API docs at `/docs`, served with headers that lock them down.

The page's script and style are inline, so that the page is one file. Its
Content-Security-Policy allows exactly those two blocks, by hash, and nothing else inline:
HTML that a model's label or an error message managed to inject could not run. The docs run
Swagger UI from files served here (fastapi-offline's) and one inline script, allowed by hash
too. Both talk only to their own origin.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

_BLOCK = r"<{tag}>(.*?)</{tag}>"
DOCS_STATIC = "/static-offline-docs"  # where fastapi-offline mounts Swagger UI's files
ICON_PATH = "/favicon.svg"  # named by the page's <link rel="icon">
# Nothing framed, no base to redirect relative URLs, nowhere to post a form.
_LOCKED = ["base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"]


@dataclass(frozen=True, slots=True)
class WebPage:
    html: str
    headers: dict[str, str]

    def response(self) -> HTMLResponse:
        return HTMLResponse(self.html, headers=self.headers)


@functools.cache
def web_page() -> WebPage:
    html = (resources.files("tandem") / "web" / "index.html").read_text(encoding="utf-8")
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(html, 'script')}",
            f"style-src {_hashes(html, 'style')}",
            "img-src 'self' blob:",  # the preview of the chosen file
            "connect-src 'self'",
            *_LOCKED,
        ]
    )
    headers = {
        "Content-Security-Policy": policy,
        "Referrer-Policy": "no-referrer",  # nosniff, as on every response: RequestIdMiddleware
    }
    return WebPage(html, headers)


@functools.cache
def docs_page(root_path: str = "") -> WebPage:
    """Swagger UI, naming the schema and its files under `root_path` (TANDEM_ROOT_PATH)."""
    static = root_path + DOCS_STATIC
    html = bytes(
        get_swagger_ui_html(
            openapi_url=f"{root_path}/openapi.json",
            title="Tandem - Swagger UI",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon.png",
        ).body
    ).decode()
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' {_hashes(html, 'script')}",
            # Swagger UI sets style attributes as it renders, which no hash can allow.
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",  # its icons
            "connect-src 'self'",  # the schema, and "Try it out"
            *_LOCKED,
        ]
    )
    return WebPage(html, {"Content-Security-Policy": policy, "Referrer-Policy": "no-referrer"})


def page_icon() -> Response:
    """The page's icon, so that a browser showing it asks for no /favicon.ico to be refused."""
    headers = {"Cache-Control": "public, max-age=86400"}
    return Response(_icon(), media_type="image/svg+xml", headers=headers)


@functools.cache
def _icon() -> bytes:
    return (resources.files("tandem") / "web" / "favicon.svg").read_bytes()


def _hashes(html: str, tag: str) -> str:
    """CSP sources for each inline `<tag>` block, as the browser hashes them: the exact text
    between the tags, UTF-8."""
    blocks = re.findall(_BLOCK.format(tag=tag), html, flags=re.DOTALL)
    if not blocks:
        return "'none'"
    digests = (hashlib.sha256(block.encode()).digest() for block in blocks)
    return " ".join(f"'sha256-{base64.b64encode(digest).decode()}'" for digest in digests)
