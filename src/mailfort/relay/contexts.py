"""TLS client contexts for outbound SMTP and for fetching MTA-STS policies.

All of them refuse anything older than TLS 1.2. The verifying context checks the chain
against a configurable CA bundle (the system's by default; tests pass their own CA) and
the host name; the others do not verify during the handshake: Python's `ssl` has no
DANE API (OpenSSL's ``SSL_dane_enable`` is not exposed), so DANE is checked against the
peer's chain right after the handshake, before anything is sent (`dane.verify_chain`).
"""

from __future__ import annotations

import ssl
from pathlib import Path


def pkix_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """Chain to a trusted root and a name match (RFC 8461 §4.2, RFC 6125): for MTA-STS
    MX hosts and for the policy host itself (RFC 8461 §3.3)."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file is not None else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    # RFC 8461 §4.2: the name must be a DNS-ID in subjectAltName; no falling back to the
    # subject CN, which OpenSSL (and so Python) otherwise does when there is no SAN.
    ctx.hostname_checks_common_name = False
    return ctx


def unverified_context() -> ssl.SSLContext:
    """Encryption without authentication in the handshake itself."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def dane_context() -> ssl.SSLContext:
    """For DANE hosts: the chain is matched against TLSA records after the handshake.
    Pass the MX name as ``server_hostname`` anyway: RFC 7672 §8.1 wants SNI sent."""
    return unverified_context()


def opportunistic_context() -> ssl.SSLContext:
    """RFC 7435 opportunistic TLS: any certificate is better than plaintext."""
    return unverified_context()
