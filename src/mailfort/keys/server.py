"""The server key: for secrets the service itself must use without a user (DKIM signing keys,
the outbound queue). Kept in a 0600 file under the data directory, apart from the directory
database, so a copy of the database or of its backups alone reveals none of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mailfort.keys.kdf import hkdf

_NONCE = 12


class ServerKey:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("server key must be 32 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "ServerKey(<redacted>)"

    @classmethod
    def load_or_create(cls, data_dir: Path) -> ServerKey:
        path = data_dir / "secrets" / "server.key"
        if path.exists():
            return cls(path.read_bytes())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = os.urandom(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another worker made it first
            return cls(path.read_bytes())
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        return cls(key)

    def derive(self, purpose: bytes) -> bytes:
        """A subkey for one purpose: a blob sealed for one use never opens for another."""
        return hkdf(self._key, b"", b"mailfort/v1/server/" + purpose)

    def _aead(self, purpose: bytes) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(self.derive(purpose))

    def seal(self, purpose: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead(purpose).encrypt(nonce, plaintext, aad)

    def open(self, purpose: bytes, blob: bytes, aad: bytes = b"") -> bytes:
        try:
            return self._aead(purpose).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
        except InvalidTag as exc:
            raise ValueError("sealed with another server key or tampered") from exc
