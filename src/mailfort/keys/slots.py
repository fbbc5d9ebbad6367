"""Key slots: every secret that opens an account wraps the same mailbox keys (as LUKS does).

A slot stores a salt, its KDF parameters, a verifier and the wrapped mailbox secrets. A
password change re-wraps one slot; revoking an app password deletes one; no mail is
re-encrypted. The verifier lets a login be rejected before any unwrap and serves logins
that need no keys (SMTP submission): it is derived from the same KDF output as the wrapping
key through HKDF with another label, so it reveals nothing about the wrapping key.
"""

from __future__ import annotations

import base64
import enum
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mailfort.keys.kdf import Argon2Params, argon2id, hkdf
from mailfort.keys.secrets import MailboxSecrets

_SALT_LEN = 16
_NONCE_LEN = 12
_KEK_INFO = b"mailfort/v1/slot-kek"
_VERIFIER_INFO = b"mailfort/v1/slot-verifier"
# 32 base32 characters carry 160 random bits, above the 128 the design asks of a secret
# that skips the slow KDF.
_GENERATED_BYTES = 20


class SlotKind(enum.StrEnum):
    PASSWORD = "password"  # noqa: S105 -- a slot kind, not a secret; chosen by a person: Argon2id
    APP = "app"  # generated: HKDF
    RECOVERY = "recovery"  # generated: HKDF


class WrongSecret(Exception):
    """The secret does not open this slot. Deliberately says nothing more."""


@dataclass(frozen=True)
class KeySlot:
    kind: SlotKind
    salt: bytes
    kdf: dict[str, Any]
    verifier: bytes
    wrapped: bytes  # nonce || ChaCha20-Poly1305(secrets)


def generate_secret() -> str:
    """A generated secret, grouped for reading aloud and typing into a mail client."""
    raw = base64.b32encode(secrets.token_bytes(_GENERATED_BYTES)).decode().lower()
    return "-".join(raw[i : i + 4] for i in range(0, len(raw), 4))


def _normalise_generated(secret: str) -> bytes:
    # People retype these: accept any case, spaces or dashes.
    return "".join(c for c in secret.lower() if c.isalnum()).encode()


def _stretch(kind: SlotKind, secret: str, salt: bytes, kdf: dict[str, Any]) -> bytes:
    if kind is SlotKind.PASSWORD:
        return argon2id(secret.encode("utf-8"), salt, Argon2Params.from_json(kdf))
    if kdf.get("alg") != "hkdf-sha256":
        raise ValueError(f"unknown KDF {kdf.get('alg')!r} for a {kind} slot")
    return hkdf(_normalise_generated(secret), salt, b"mailfort/v1/generated")


def _aad(owner: bytes, kind: SlotKind) -> bytes:
    # Binding the slot to its mailbox and kind stops a wrapped blob being moved to another
    # account's row or relabelled.
    return b"mailfort/v1/slot|" + owner + b"|" + kind.value.encode()


def create_slot(
    kind: SlotKind,
    secret: str,
    mailbox_secrets: MailboxSecrets,
    owner: bytes,
    params: Argon2Params | None = None,
) -> KeySlot:
    salt = os.urandom(_SALT_LEN)
    if kind is SlotKind.PASSWORD:
        kdf = (params or Argon2Params.from_env()).to_json()
    else:
        kdf = {"alg": "hkdf-sha256"}
    master = _stretch(kind, secret, salt, kdf)
    kek = hkdf(master, salt, _KEK_INFO)
    nonce = os.urandom(_NONCE_LEN)
    wrapped = nonce + ChaCha20Poly1305(kek).encrypt(
        nonce, mailbox_secrets.to_bytes(), _aad(owner, kind)
    )
    return KeySlot(kind, salt, kdf, hkdf(master, salt, _VERIFIER_INFO), wrapped)


def _master_if_valid(slot: KeySlot, secret: str) -> bytes:
    master = _stretch(slot.kind, secret, slot.salt, slot.kdf)
    if not hmac.compare_digest(hkdf(master, slot.salt, _VERIFIER_INFO), slot.verifier):
        raise WrongSecret
    return master


def verify_slot(slot: KeySlot, secret: str) -> bool:
    """True when ``secret`` belongs to this slot; compared in constant time."""
    try:
        _master_if_valid(slot, secret)
    except WrongSecret:
        return False
    return True


def open_slot(slot: KeySlot, secret: str, owner: bytes) -> MailboxSecrets:
    master = _master_if_valid(slot, secret)
    kek = hkdf(master, slot.salt, _KEK_INFO)
    nonce, body = slot.wrapped[:_NONCE_LEN], slot.wrapped[_NONCE_LEN:]
    try:
        plain = ChaCha20Poly1305(kek).decrypt(nonce, body, _aad(owner, slot.kind))
    except InvalidTag as exc:
        # The verifier matched but the blob does not open: tampering, not a wrong password.
        raise WrongSecret from exc
    return MailboxSecrets.from_bytes(plain)
