"""Sealed delivery: encrypt a message to a mailbox's public keys (hybrid X25519 + ML-KEM-768).

Mail that arrives while nobody holds the mailbox keys is sealed so that only the mailbox's
private keys open it: the server can write the spool but never read it back. The combiner
hashes both shared secrets together with the ciphertexts and the recipient's keys (the
X-Wing construction's inputs), so the seal holds while either primitive holds.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mailfort.keys.kdf import hkdf
from mailfort.keys.secrets import MailboxSecrets, PublicKeys

_VERSION = b"\x01"
_X_LEN = 32
_CT_LEN = 1088
_NONCE_LEN = 12
_HEADER_LEN = 1 + _X_LEN + _CT_LEN + _NONCE_LEN
_LABEL = b"mailfort/v1/seal"


class SealError(Exception):
    """A sealed blob does not open with these keys (wrong mailbox or tampered)."""


def _combine(ss_m: bytes, ss_x: bytes, eph: bytes, ct: bytes, pk_x: bytes) -> bytes:
    return hkdf(ss_m + ss_x, b"", _LABEL + eph + ct + pk_x)


def seal(keys: PublicKeys, plaintext: bytes) -> bytes:
    eph = x25519.X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    ss_x = eph.exchange(x25519.X25519PublicKey.from_public_bytes(keys.x25519))
    ss_m, ct = mlkem.MLKEM768PublicKey.from_public_bytes(keys.mlkem768).encapsulate()
    key = _combine(ss_m, ss_x, eph_pub, ct, keys.x25519)
    nonce = os.urandom(_NONCE_LEN)
    header = _VERSION + eph_pub + ct + nonce
    return header + ChaCha20Poly1305(key).encrypt(nonce, plaintext, header)


def unseal(secrets: MailboxSecrets, blob: bytes) -> bytes:
    if len(blob) < _HEADER_LEN + 16 or blob[:1] != _VERSION:
        raise SealError("malformed sealed message")
    eph_pub = blob[1 : 1 + _X_LEN]
    ct = blob[1 + _X_LEN : 1 + _X_LEN + _CT_LEN]
    nonce = blob[_HEADER_LEN - _NONCE_LEN : _HEADER_LEN]
    xkey = secrets.x25519_key()
    try:
        ss_x = xkey.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise SealError("malformed sealed message") from exc
    ss_m = secrets.mlkem_key().decapsulate(ct)
    key = _combine(ss_m, ss_x, eph_pub, ct, xkey.public_key().public_bytes_raw())
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, blob[_HEADER_LEN:], blob[:_HEADER_LEN])
    except InvalidTag as exc:
        raise SealError("sealed message does not open with this mailbox's keys") from exc
