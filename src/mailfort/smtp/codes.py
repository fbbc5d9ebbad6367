"""Enhanced status codes (RFC 3463) on every reply, as RFC 2034 requires once advertised.

The core's own replies carry theirs; a handler's reply without one gets the generic code
for its reply class from ``with_enhanced_code``.
"""

from __future__ import annotations

import re

_HAS_CODE = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?:[ -]|$)")

# RFC 3463 §3.5 (protocol) and §3.7 (security) codes by reply code.
_DEFAULTS = {
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "251": "2.1.5",
    "252": "2.5.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "550": "5.0.0",
    "551": "5.1.6",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}


def with_enhanced_code(reply: str) -> str:
    """Insert the default enhanced code after the reply code; leaves 220, 334, 354 alone."""
    if _HAS_CODE.match(reply) or len(reply) < 3:
        return reply
    code = reply[:3]
    enhanced = _DEFAULTS.get(code)
    if enhanced is None:
        return reply
    sep = reply[3:4] or " "
    text = reply[4:]
    return f"{code}{sep}{enhanced} {text}".rstrip()
