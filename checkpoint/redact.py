"""Store URLs as they may be shown: without the password they may carry.

A module of its own, importing nothing of tally's: the stores redact their own URL in
their errors, and ``urls.py`` opens the stores, so neither can import the other for it.
"""

from __future__ import annotations

import re

_USERINFO_RE = re.compile(r"//([^/@:]*):[^/@]*@")


def redact_url(url: str) -> str:
    """The URL without its password: errors end up in logs."""
    return _USERINFO_RE.sub(r"//\1:***@", url, count=1)
