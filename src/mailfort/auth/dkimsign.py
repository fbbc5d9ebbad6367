"""DKIM signing of outgoing mail: Ed25519 and RSA side by side (RFC 8463 §3, RFC 6376 §5).

dkimpy canonicalises and builds the header; its RSA arithmetic is pure Python (~5.4 ms per
RSA-2048 signature here), so that one step runs through OpenSSL (`cryptography`) instead,
which yields the identical RSASSA-PKCS1-v1_5 signature in ~0.3 ms.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from mailfort.directory.service import SigningKey

_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}  # noqa: S303


@functools.lru_cache(maxsize=256)
def _rsa_key(numbers: tuple[int, ...]) -> rsa.RSAPrivateKey:
    n, e, d, p, q, dp, dq, qi = numbers
    return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)).private_key()


def _openssl_sign(hash_obj: Any, private_key: dict[str, int]) -> bytes:
    key = _rsa_key(
        (
            private_key["modulus"],
            private_key["publicExponent"],
            private_key["privateExponent"],
            private_key["prime1"],
            private_key["prime2"],
            private_key["exponent1"],
            private_key["exponent2"],
            private_key["coefficient"],
        )
    )
    algorithm = _HASHES[hash_obj.name]
    return key.sign(hash_obj.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


# dkimpy calls this module-level name from DKIM.sign (and ARC.sign).
dkim.RSASSA_PKCS1_v1_5_sign = _openssl_sign


def sign(message: bytes, keys: Sequence[SigningKey]) -> bytes:
    """The message with one DKIM-Signature per key prepended, each over the original."""
    headers = []
    for key in keys:
        algorithm = b"ed25519-sha256" if key.algorithm == "ed25519" else b"rsa-sha256"
        headers.append(
            dkim.sign(
                message,
                key.selector.encode(),
                key.domain.encode(),
                key.private,
                signature_algorithm=algorithm,
                canonicalize=(b"relaxed", b"relaxed"),
                linesep=b"\r\n",
            )
        )
    return b"".join(headers) + message
