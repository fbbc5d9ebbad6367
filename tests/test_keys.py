"""The key hierarchy: slots wrap the mailbox keys; sealed delivery opens only with them."""

from __future__ import annotations

import dataclasses

import pytest

from mailfort.keys.kdf import Argon2Params
from mailfort.keys.seal import SealError, seal, unseal
from mailfort.keys.secrets import MailboxSecrets, PublicKeys
from mailfort.keys.slots import (
    SlotKind,
    WrongSecret,
    create_slot,
    generate_secret,
    open_slot,
    verify_slot,
)

FAST = Argon2Params(memory_kib=8192, time_cost=1)


def test_password_slot_opens_with_password_only() -> None:
    keys = MailboxSecrets.generate()
    slot = create_slot(SlotKind.PASSWORD, "correct horse battery", keys, b"mbx1", FAST)
    assert slot.kdf["alg"] == "argon2id" and slot.kdf["memory_kib"] == 8192
    opened = open_slot(slot, "correct horse battery", b"mbx1")
    assert opened.data_key == keys.data_key
    assert opened.public_keys() == keys.public_keys()
    with pytest.raises(WrongSecret):
        open_slot(slot, "correct horse batterY", b"mbx1")
    assert not verify_slot(slot, "wrong")


def test_generated_secret_has_160_bits_and_tolerates_retyping() -> None:
    secret = generate_secret()
    assert len(secret.replace("-", "")) == 32  # base32: 160 bits
    keys = MailboxSecrets.generate()
    slot = create_slot(SlotKind.APP, secret, keys, b"m")
    assert slot.kdf == {"alg": "hkdf-sha256"}  # no slow KDF for generated secrets
    assert open_slot(slot, secret.upper().replace("-", " "), b"m").data_key == keys.data_key
    assert generate_secret() != secret


def test_slot_is_bound_to_its_mailbox_and_kind() -> None:
    keys = MailboxSecrets.generate()
    secret = generate_secret()
    slot = create_slot(SlotKind.APP, secret, keys, b"alice")
    with pytest.raises(WrongSecret):
        open_slot(slot, secret, b"mallory")  # moved to another account's row
    relabelled = dataclasses.replace(slot, kind=SlotKind.RECOVERY)
    with pytest.raises(WrongSecret):
        open_slot(relabelled, secret, b"alice")
    tampered = dataclasses.replace(slot, wrapped=slot.wrapped[:-1] + bytes([slot.wrapped[-1] ^ 1]))
    with pytest.raises(WrongSecret):
        open_slot(tampered, secret, b"alice")


def test_seal_opens_only_with_the_mailbox_keys() -> None:
    alice, bob = MailboxSecrets.generate(), MailboxSecrets.generate()
    message = b"Subject: hi\r\n\r\nsecret body\r\n"
    blob = seal(alice.public_keys(), message)
    assert message not in blob and b"secret body" not in blob
    assert unseal(alice, blob) == message
    with pytest.raises(SealError):
        unseal(bob, blob)
    with pytest.raises(SealError):
        unseal(alice, blob[:-1] + bytes([blob[-1] ^ 1]))
    assert seal(alice.public_keys(), message) != blob  # fresh ephemeral keys each time


def test_public_key_bundle_round_trips() -> None:
    pub = MailboxSecrets.generate().public_keys()
    assert PublicKeys.from_bytes(pub.to_bytes()) == pub
    assert len(pub.mlkem768) == 1184
    with pytest.raises(ValueError):
        PublicKeys.from_bytes(pub.to_bytes()[:-1])


def test_secrets_never_print() -> None:
    assert "redacted" in repr(MailboxSecrets.generate())


def test_weak_argon2_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILFORT_ARGON2_MEMORY_KIB", "1024")
    with pytest.raises(ValueError, match="MAILFORT_ARGON2_MEMORY_KIB"):
        Argon2Params.from_env()
