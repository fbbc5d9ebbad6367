"""Sealed delivery: encrypt a message to a mailbox's public keys (hybrid X25519 + ML-KEM-768).

Mail that arrives while nobody holds the mailbox keys is sealed so that only the mailbox's
private keys open it: the server can write the spool but never read it back. The combiner
hashes both shared secrets together with the ciphertexts and the recipient's keys (the
X-Wing construction's inputs), so the seal holds while either primitive holds.
"""

from __future__ import annotations

import os
import threading
import time

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


def _encapsulate(keys: PublicKeys) -> tuple[bytes, bytes]:
    """A fresh key only the mailbox can recover, and the header (ephemeral key, KEM ciphertext)."""
    eph = x25519.X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    ss_x = eph.exchange(x25519.X25519PublicKey.from_public_bytes(keys.x25519))
    ss_m, ct = mlkem.MLKEM768PublicKey.from_public_bytes(keys.mlkem768).encapsulate()
    return _VERSION + eph_pub + ct, _combine(ss_m, ss_x, eph_pub, ct, keys.x25519)


def _decapsulate(secrets: MailboxSecrets, header: bytes) -> bytes:
    if len(header) != 1 + _X_LEN + _CT_LEN or header[:1] != _VERSION:
        raise SealError("malformed sealed message")
    eph_pub, ct = header[1 : 1 + _X_LEN], header[1 + _X_LEN :]
    xkey = secrets.x25519_key()
    try:
        ss_x = xkey.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise SealError("malformed sealed message") from exc
    ss_m = secrets.mlkem_key().decapsulate(ct)
    return _combine(ss_m, ss_x, eph_pub, ct, xkey.public_key().public_bytes_raw())


def seal(keys: PublicKeys, plaintext: bytes) -> bytes:
    """Seal one message on its own: header || nonce || ciphertext."""
    header, key = _encapsulate(keys)
    nonce = os.urandom(_NONCE_LEN)
    return header + nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, header + nonce)


class SealingEpoch:
    """One encapsulation shared by the messages sealed to a mailbox in a short window.

    The hybrid encapsulation costs ~80 µs, ten times the AEAD on a 5 KB message; a spool
    under load shares it across at most ``max_uses`` messages or ``max_age`` seconds. The
    epoch key lives only in the delivering process's memory for that window, while it holds
    those messages' plaintext anyway, and is dropped at rotation. Random 96-bit nonces are
    safe for far more messages than an epoch carries.
    """

    def __init__(self, keys: PublicKeys, max_uses: int = 256, max_age: float = 5.0) -> None:
        self.header, key = _encapsulate(keys)
        self.id = os.urandom(16)
        self._aead = ChaCha20Poly1305(key)
        self._expires = time.monotonic() + max_age
        self._left = max_uses
        self._lock = threading.Lock()

    def try_seal(self, plaintext: bytes) -> bytes | None:
        """The sealed blob, or None when this epoch is used up (make a new one)."""
        with self._lock:
            if self._left <= 0 or time.monotonic() > self._expires:
                return None
            self._left -= 1
        nonce = os.urandom(_NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, plaintext, self.id)


class OpenedEpoch:
    def __init__(self, secrets: MailboxSecrets, epoch_id: bytes, header: bytes) -> None:
        self.id = epoch_id
        self._aead = ChaCha20Poly1305(_decapsulate(secrets, header))

    def unseal(self, blob: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:_NONCE_LEN], blob[_NONCE_LEN:], self.id)
        except InvalidTag as exc:
            raise SealError("sealed message does not open with this mailbox's keys") from exc


def unseal(secrets: MailboxSecrets, blob: bytes) -> bytes:
    if len(blob) < _HEADER_LEN + 16:
        raise SealError("malformed sealed message")
    header, nonce = blob[: _HEADER_LEN - _NONCE_LEN], blob[_HEADER_LEN - _NONCE_LEN : _HEADER_LEN]
    key = _decapsulate(secrets, header)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, blob[_HEADER_LEN:], blob[:_HEADER_LEN])
    except InvalidTag as exc:
        raise SealError("sealed message does not open with this mailbox's keys") from exc
