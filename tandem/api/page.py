"""The web page at `/`, served with headers that lock it down.

Its script and style are inline, so that the page is one file. The Content-Security-Policy
allows exactly those two blocks, by hash, and nothing else inline: HTML that a model's label or
an error message managed to inject could not run. The page talks only to its own origin.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

_BLOCK = r"<{tag}>(.*?)</{tag}>"


@dataclass(frozen=True, slots=True)
class WebPage:
    html: str
    headers: dict[str, str]


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
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    headers = {
        "Content-Security-Policy": policy,
        "Referrer-Policy": "no-referrer",  # nosniff, as on every response: RequestIdMiddleware
    }
    return WebPage(html, headers)


def _hashes(html: str, tag: str) -> str:
    """CSP sources for each inline `<tag>` block, as the browser hashes them: the exact text
    between the tags, UTF-8."""
    blocks = re.findall(_BLOCK.format(tag=tag), html, flags=re.DOTALL)
    if not blocks:
        return "'none'"
    digests = (hashlib.sha256(block.encode()).digest() for block in blocks)
    return " ".join(f"'sha256-{base64.b64encode(digest).decode()}'" for digest in digests)
