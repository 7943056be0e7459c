"""Where the chat page's files are, and the headers it is served with."""
from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).with_name("static")

# The page loads only its own files; images are data:/blob: URLs it makes itself.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                               "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
