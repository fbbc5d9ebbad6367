"""DKIM signing of outgoing mail: Ed25519 and RSA side by side (RFC 8463 §3, RFC 6376 §5).

`sign` is `auth.signing.dkim_sign`. Where dkimpy still signs (its ARC signer, which the
tests use to play other forwarders), its RSA arithmetic, pure Python and ~5.4 ms per
RSA-2048 signature here, runs through OpenSSL (`cryptography`) instead: the identical
RSASSA-PKCS1-v1_5 signature in ~0.3 ms.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from mailfort.auth import signing
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
    """The message with one DKIM-Signature per key prepended, each over the original.

    Made by `auth.signing` (keys parsed once, the body hashed once for both signatures);
    dkimpy stays the verifier that the tests check its output with.
    """
    return signing.dkim_sign(message, keys)
