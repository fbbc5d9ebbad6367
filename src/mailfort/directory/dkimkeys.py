"""DKIM key pairs per domain: Ed25519 and RSA-2048 side by side (RFC 8463 dual signing).

Receivers that know Ed25519 check the short, fast signature; the rest check RSA. Rotation
adds a new pair under new selectors and retires the old pair, which stays published until
mail signed with it has had time to be verified.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ALGORITHMS = ("ed25519", "rsa")


@dataclass(frozen=True)
class NewKey:
    selector: str
    algorithm: str
    private: bytes  # dkimpy's form: base64 seed for Ed25519, PKCS#1 PEM for RSA
    public_b64: str


def selector_for(algorithm: str, taken: set[str], now: float | None = None) -> str:
    """`mfYYYYMM` + `e`/`r`, with a counter when rotated twice in a month."""
    stem = time.strftime("mf%Y%m", time.gmtime(now)) + ("e" if algorithm == "ed25519" else "r")
    candidate, n = stem, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}{n}"
    return candidate


def generate(algorithm: str, selector: str) -> NewKey:
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        raw_pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return NewKey(
            selector, algorithm, base64.b64encode(seed), base64.b64encode(raw_pub).decode()
        )
    if algorithm == "rsa":
        rkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = rkey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        spki = rkey.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return NewKey(selector, algorithm, pem, base64.b64encode(spki).decode())
    raise ValueError(f"unknown DKIM algorithm {algorithm!r}")


def dns_value(algorithm: str, public_b64: str) -> str:
    """The TXT value of RFC 6376 §3.6.1 (k=ed25519 per RFC 8463 §4.2)."""
    return f"v=DKIM1; k={'ed25519' if algorithm == 'ed25519' else 'rsa'}; p={public_b64}"
