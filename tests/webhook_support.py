"""A webhook receiver for tests: HTTPS on 127.0.0.1 that checks signatures as documented.

`WebhookReceiver` is what an operator's endpoint would be: it verifies each request with
the recipe in `mailfort.relay.webhook`'s docstring, written out here independently
(hmac + hashlib, not mailfort's own `verify_signature`), answers 401 when the signature
or timestamp is wrong and 200 otherwise, and records what arrived. A test may replace
the answer (an error status, a redirect, a large body, or no answer at all).

The server runs in a thread so it outlives any one event loop.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from test_relay_support import CA, NOW, Canned, HTTPSServer, Issued, SeenRequest

REPLAY_WINDOW = 300


@dataclass
class Answer:
    status: int | None = None  # None: 200 when the signature verifies, else 401
    body: bytes = b""
    headers: Sequence[tuple[str, str]] = ()
    hang: bool = False  # read the request, never answer


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    sni: str | None
    verified: bool
    payload: Any  # the parsed JSON when verified, else None


def receiver_verifies(headers: dict[str, str], body: bytes, secret: bytes) -> bool:
    """The documented recipe, step by step."""
    stamp = headers.get("x-mailfort-timestamp")
    signature = headers.get("x-mailfort-signature")
    if stamp is None or signature is None:
        return False
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > REPLAY_WINDOW:
        return False
    expected = hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    candidates = [
        item.strip()[3:] for item in signature.split(",") if item.strip().startswith("v1=")
    ]
    return any(hmac.compare_digest(expected, c) for c in candidates)


class WebhookReceiver:
    """The operator's endpoint: an `HTTPSServer` whose answers follow the signature check."""

    def __init__(self, context: ssl.SSLContext, secret: bytes, *, host: str = "127.0.0.1") -> None:
        self.secret = secret
        self.answer = Answer()
        self.requests: list[Received] = []
        self._https = HTTPSServer(context, respond=self._respond, host=host)
        self.port = self._https.port

    @property
    def context(self) -> ssl.SSLContext:
        return self._https.context

    @context.setter
    def context(self, value: ssl.SSLContext) -> None:
        self._https.context = value

    def _respond(self, seen: SeenRequest) -> Canned:
        verified = receiver_verifies(seen.headers, seen.body, self.secret)
        payload = json.loads(seen.body) if verified else None
        self.requests.append(
            Received(seen.method, seen.path, seen.headers, seen.body, seen.sni, verified, payload)
        )
        answer = self.answer
        status = answer.status if answer.status is not None else (200 if verified else 401)
        return Canned(status, answer.body, answer.headers, answer.hang)

    def reset(self) -> None:
        self.answer = Answer()
        self.requests.clear()

    def close(self) -> None:
        self._https.close()


def issue_for_address(ca: CA, address: str) -> Issued:
    """A server certificate naming an IP address (iPAddress SAN), as a CA would issue
    for ``https://[2001:db8::1]/``."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key, ca.chain_above())


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
