"""A mailbox's secret keys and the public halves that let anyone deliver to it.

Each mailbox has a random 256-bit data key (the SQLite3MC page key) and a delivery key pair,
X25519 + ML-KEM-768: mail for a closed mailbox is sealed to both, so it stays confidential if
either primitive falls (classical today, quantum later).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

_VERSION = 1
DATA_KEY_LEN = 32
_X25519_LEN = 32
_MLKEM_SEED_LEN = 64
SECRETS_LEN = 1 + DATA_KEY_LEN + _X25519_LEN + _MLKEM_SEED_LEN


@dataclass(frozen=True)
class PublicKeys:
    x25519: bytes  # 32 bytes
    mlkem768: bytes  # 1184 bytes

    def to_bytes(self) -> bytes:
        return bytes([_VERSION]) + self.x25519 + self.mlkem768

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicKeys:
        if len(data) != 1 + _X25519_LEN + 1184 or data[0] != _VERSION:
            raise ValueError("malformed public key bundle")
        return cls(data[1 : 1 + _X25519_LEN], data[1 + _X25519_LEN :])


class MailboxSecrets:
    """The keys a key slot wraps. Held in memory only while a session needs them."""

    __slots__ = ("_mlkem_seed", "_x25519", "data_key")

    def __init__(self, data_key: bytes, x25519_private: bytes, mlkem_seed: bytes) -> None:
        if (len(data_key), len(x25519_private), len(mlkem_seed)) != (
            DATA_KEY_LEN,
            _X25519_LEN,
            _MLKEM_SEED_LEN,
        ):
            raise ValueError("malformed mailbox secrets")
        self.data_key = data_key
        self._x25519 = x25519_private
        self._mlkem_seed = mlkem_seed

    def __repr__(self) -> str:
        return "MailboxSecrets(<redacted>)"

    @classmethod
    def generate(cls) -> MailboxSecrets:
        x = x25519.X25519PrivateKey.generate().private_bytes_raw()
        m = mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
        return cls(os.urandom(DATA_KEY_LEN), x, m)

    def to_bytes(self) -> bytes:
        return bytes([_VERSION]) + self.data_key + self._x25519 + self._mlkem_seed

    @classmethod
    def from_bytes(cls, data: bytes) -> MailboxSecrets:
        if len(data) != SECRETS_LEN or data[0] != _VERSION:
            raise ValueError("malformed mailbox secrets")
        a, b = 1 + DATA_KEY_LEN, 1 + DATA_KEY_LEN + _X25519_LEN
        return cls(data[1:a], data[a:b], data[b:])

    def x25519_key(self) -> x25519.X25519PrivateKey:
        return x25519.X25519PrivateKey.from_private_bytes(self._x25519)

    def mlkem_key(self) -> mlkem.MLKEM768PrivateKey:
        return mlkem.MLKEM768PrivateKey.from_seed_bytes(self._mlkem_seed)

    def public_keys(self) -> PublicKeys:
        return PublicKeys(
            self.x25519_key().public_key().public_bytes_raw(),
            self.mlkem_key().public_key().public_bytes_raw(),
        )
