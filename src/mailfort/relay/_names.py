"""Host name normalisation and the one-label wildcard rule both MTA-STS and DANE use."""

from __future__ import annotations


def normalize_host(name: str) -> str:
    """Lower-case A-label form without the trailing dot, for comparisons.

    DNS answers carry a trailing dot and any case; policies and certificates carry
    neither reliably. A name that is not valid IDNA is returned lower-cased as it is,
    so it simply fails to match anything.
    """
    name = name.strip().rstrip(".").lower()
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def wildcard_match(pattern: str, host: str) -> bool:
    """``pattern`` matches ``host`` exactly, or as ``*.base`` standing for one label.

    RFC 8461 §4.1 (MX patterns) and RFC 6125 §6.4.3 as profiled by RFC 7672 §3.2.3
    (certificate names): the wildcard is a whole left-most label and covers exactly one
    label, so ``*.example.com`` matches ``mx.example.com`` but neither ``example.com``
    nor ``a.mx.example.com``.
    """
    pattern = normalize_host(pattern)
    host = normalize_host(host)
    if not pattern or not host:
        return False
    if pattern.startswith("*."):
        base = pattern[2:]
        first, dot, rest = host.partition(".")
        return bool(base) and bool(dot) and bool(first) and first != "*" and rest == base
    return pattern == host
