"""Our DKIM signer and ARC sealer, checked by dkimpy's verifiers (an implementation we did
not write) on ordinary, awkward and generated messages. End to end, tests/test_forward.py
has Mail::DKIM check both on what a real Postfix received."""

from __future__ import annotations

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.auth.signing import SigningError, arc_seal, dkim_sign
from mailfort.directory import dkimkeys
from mailfort.directory.service import SigningKey

AUTHSERV = b"mx.example.test"


def make_keys(domain: str = "example.test") -> tuple[list[SigningKey], dict[bytes, bytes]]:
    keys, zone = [], {}
    for algorithm in dkimkeys.ALGORITHMS:
        new = dkimkeys.generate(algorithm, f"sel-{algorithm}")
        keys.append(SigningKey(domain, new.selector, new.algorithm, new.private))
        name = f"{new.selector}._domainkey.{domain}.".encode()
        zone[name] = dkimkeys.dns_value(algorithm, new.public_b64).encode()
    return keys, zone


KEYS, ZONE = make_keys()
OTHER_KEYS, OTHER_ZONE = make_keys("forwarder.test")
ALL_ZONES = {**ZONE, **OTHER_ZONE}
RSA = next(k for k in KEYS if k.algorithm == "rsa")
OTHER_RSA = next(k for k in OTHER_KEYS if k.algorithm == "rsa")


def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
    return ALL_ZONES.get(name if name.endswith(b".") else name + b".", b"")


def verify_all(message: bytes) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature, newest first."""
    d = dkim.DKIM(message)
    count = sum(1 for n, _ in d.headers if n.lower() == b"dkim-signature")
    out = []
    for i in range(count):
        try:
            out.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.ValidationError:
            out.append(False)
    return out


MESSAGE = (
    b"Received: from a by b; Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"From: Sam <sam@sender.test>\r\nTo: <fwd@example.test>\r\n"
    b"Subject: a   subject\twith  odd\r\n spacing, folded\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n"
    b"\r\nbody line  with  spaces \t\r\n\r\nsecond\r\n\r\n\r\n"
)


def test_both_signatures_verify_with_dkimpy() -> None:
    signed = dkim_sign(MESSAGE, KEYS)
    assert signed.endswith(MESSAGE)
    assert verify_all(signed) == [True, True]
    assert b"a=ed25519-sha256" in signed and b"a=rsa-sha256" in signed
    assert b"h=from:to:subject:date:message-id:from" in signed  # From signed once more


def test_a_changed_body_or_added_from_breaks_them() -> None:
    signed = dkim_sign(MESSAGE, KEYS)
    assert verify_all(signed.replace(b"second", b"Second")) == [False, False]
    assert verify_all(b"From: evil@x.test\r\n" + signed) == [False, False]


def aar_value(arc: str) -> bytes:
    return AUTHSERV + b";\r\n\tspf=pass smtp.mailfrom=sender.test;\r\n\tarc=" + arc.encode()


def test_first_arc_set_verifies_with_dkimpy() -> None:
    sealed = arc_seal(MESSAGE, RSA, aar_value("none"), "none")
    assert sealed.startswith(b"ARC-Seal: i=1;")
    cv, _results, reason = dkim.arc_verify(sealed, dnsfunc=dnsfunc)
    assert cv == b"pass", reason


def test_second_set_over_a_passing_chain_verifies() -> None:
    first = arc_seal(MESSAGE, OTHER_RSA, aar_value("none"), "none")
    second = arc_seal(first, RSA, aar_value("pass"), "pass")
    cv, results, reason = dkim.arc_verify(second, dnsfunc=dnsfunc)
    assert cv == b"pass", reason
    assert [r["instance"] for r in results] == [2, 1]


def test_a_tampered_chain_fails_verification() -> None:
    first = arc_seal(MESSAGE, OTHER_RSA, aar_value("none"), "none")
    second = arc_seal(first, RSA, aar_value("pass"), "pass")
    # Changed after our seal: the newest AMS no longer matches.
    cv, _results, _reason = dkim.arc_verify(second.replace(b"second", b"changed"), dnsfunc=dnsfunc)
    assert cv == b"fail"
    # An earlier seal altered: the seals chain over every set.
    forged = second.replace(b"ARC-Seal: i=1; a=rsa-sha256; t=", b"ARC-Seal: i=1; a=rsa-sha256; t=1")
    cv, _results, _reason = dkim.arc_verify(forged, dnsfunc=dnsfunc)
    assert cv == b"fail"


def test_sealing_refuses_what_rfc_8617_forbids() -> None:
    ed = next(k for k in KEYS if k.algorithm == "ed25519")
    with pytest.raises(SigningError):
        arc_seal(MESSAGE, ed, aar_value("none"), "none")
    with pytest.raises(SigningError):
        arc_seal(MESSAGE, RSA, aar_value("pass"), "pass")  # nothing to pass
    with pytest.raises(SigningError):
        arc_seal(b"\tcontinuation first\r\n\r\nx", RSA, aar_value("none"), "none")


_header_text = st.text(
    st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=60
).map(lambda s: s.replace(":", ""))
_body_line = st.text(st.sampled_from([" ", "\t", "a", "b", "."]), min_size=0, max_size=30)


@settings(max_examples=60, deadline=None)
@given(
    subject=_header_text,
    lines=st.lists(_body_line, max_size=12),
    trailing=st.sampled_from(["", "\r\n", "\r\n\r\n"]),
)
def test_generated_messages_sign_and_seal_verifiably(
    subject: str, lines: list[str], trailing: str
) -> None:
    message = (
        f"From: a@sender.test\r\nSubject: {subject}\r\n\r\n" + "\r\n".join(lines) + trailing
    ).encode()
    signed = dkim_sign(message, KEYS)
    assert verify_all(signed) == [True, True]
    cv, _results, reason = dkim.arc_verify(
        arc_seal(signed, RSA, aar_value("none"), "none"), dnsfunc=dnsfunc
    )
    assert cv == b"pass", reason
