"""mailfort.auth.canon gives dkimpy's bytes: message splitting, canonicalisation, b= removal
and the header data hashed, on the corpora and on generated input.

dkimpy is the reference (it passes the DKIM and ARC suites); any difference would make a
good signature fail or, worse, hash other bytes than the signer did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import dkim.canonicalization as dc
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailfort.auth import canon

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
SETTINGS = settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The characters the functions treat specially, plus ordinary text.
_ALPHABET = st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"b", b"=", b";", b":"])
_RAW = st.lists(
    st.one_of(_ALPHABET, st.sampled_from([b"From ", b"X-H: v", b".", b"\x00", b"\xc3\xa9"])),
    max_size=60,
).map(b"".join)


def _corpus_messages() -> Iterator[Any]:
    yield pytest.param((CORPORA / "dkim-rfc8463" / "signed.eml").read_bytes(), id="rfc8463")
    suite = CORPORA / "arc" / "arc-draft-validation-tests.yml"
    for scenario in yaml.safe_load_all(suite.read_text()):
        for name, case in scenario["tests"].items():
            text = case["message"]
            yield pytest.param(text.replace("\n", "\r\n").encode(), id=f"arc-{name}-crlf")
            yield pytest.param(text.encode(), id=f"arc-{name}-lf")
    mime = sorted(p for p in (CORPORA / "mime").rglob("*") if p.suffix in {".msg", ".eml"})
    for path in mime[:300]:
        yield pytest.param(path.read_bytes(), id=f"mime-{path.name}")


def _parse_both(raw: bytes) -> tuple[Any, Any]:
    outcomes = []
    for parse in (dkim.rfc822_parse, canon.rfc822_parse):
        try:
            headers, body = parse(raw)
            outcomes.append(([(bytes(n), bytes(v)) for n, v in headers], bytes(body)))
        except (dkim.MessageFormatError, IndexError) as exc:
            outcomes.append(type(exc))
    return outcomes[0], outcomes[1]


def _check_message(raw: bytes) -> None:
    theirs, ours = _parse_both(raw)
    assert ours == theirs
    if not isinstance(theirs, tuple):
        return
    headers, body = theirs
    for algorithm in (dc.Simple, dc.Relaxed):
        name = algorithm.name
        assert canon.canonicalize_body(name, body) == algorithm.canonicalize_body(body)
        fields = algorithm.canonicalize_headers(headers)
        assert canon.canonicalize_headers(name, headers) == list(fields)
        names = [n.lower() for n, _ in fields]
        for i, (hname, hvalue) in enumerate(headers):
            if hname.lower() not in (b"dkim-signature", b"arc-seal", b"arc-message-signature"):
                continue
            include = [b"from", b"subject", b"to", b"from", b"date", b"dkim-signature"][: i + 3]
            _compare_hash(name, fields, names, include, (hname, hvalue))


def _compare_hash(
    algorithm: bytes,
    fields: list[tuple[bytes, bytes]],
    names: list[bytes],
    include: list[bytes],
    sig_header: tuple[bytes, bytes],
) -> None:
    policy = dc.CanonicalizationPolicy(dc.ALGORITHMS[algorithm], dc.ALGORITHMS[algorithm])
    theirs = hashlib.sha256()
    dkim.hash_headers(theirs, policy, fields, include, sig_header, {})
    ours = hashlib.sha256()
    for piece in canon.signed_header_data(algorithm, fields, names, include, sig_header):
        ours.update(piece)
    assert ours.digest() == theirs.digest()


@pytest.mark.parametrize("raw", list(_corpus_messages()))
def test_corpora_match_dkimpy(raw: bytes) -> None:
    _check_message(raw)


@SETTINGS
@given(_RAW)
@example(b"")
@example(b"\r\n")
@example(b"\n")
@example(b"A: b")
@example(b"A: b\n")
@example(b"A: b\r\n\r\n")
@example(b"A: b\r\r\n\r\nbody \t \r\n\r\n")
@example(b" continuation first\r\n")
@example(b"From sender line\r\nA: b\n\nx\ny\r\n")
@example(b"::x\r\n\r\n")  # a name that starts with a colon: the next colon ends it
@example(b":\r\n")  # a lone colon is no name
@example(b":a:b\r\nA b: c\r\n")
def test_parse_and_body_match_dkimpy(raw: bytes) -> None:
    _check_message(raw)


@SETTINGS
@given(_RAW)
@example(b"a \t b  \r\n\t\r\n\r\n\r\n")
@example(b"\r\n")
@example(b" \r\n")
@example(b"x\r\r\n \n")
def test_body_canonicalisation_matches_dkimpy(body: bytes) -> None:
    assert canon.canonicalize_body(b"relaxed", body) == dc.Relaxed.canonicalize_body(body)
    assert canon.canonicalize_body(b"simple", body) == dc.Simple.canonicalize_body(body)


@SETTINGS
@given(_RAW, _RAW)
@example(b"Subject ", b" a\r\n\t b \r\r\n\n  c \r\n")
def test_header_canonicalisation_matches_dkimpy(name: bytes, value: bytes) -> None:
    assert canon.relaxed_header(name, value) == dc.Relaxed.canonicalize_headers([(name, value)])[0]


_SIG_PIECES = st.sampled_from(
    [b" ", b"\t", b"\r\n ", b"\n", b"\r", b";", b"b", b"=", b"bh", b"A", b"+/", b"9", b"h=a:b"]
)


@SETTINGS
@given(st.lists(_SIG_PIECES, max_size=40).map(b"".join))
@example(b" v=1; a=rsa-sha256; bh=abc=; b=dGVz\r\n dA==\r\n")
@example(b";b =  AB\r\n CD \t\r\n")
@example(b" b=\r\n")
@example(b"b=x; b=y")
@example(b";b=AB \r\n")  # white space after the last base64 character stays
@example(b" b=A B\r\n C\n")
def test_b_tag_removal_matches_dkimpy(value: bytes) -> None:
    assert canon.strip_b_tag(value) == dkim.RE_BTAG.sub(b"\\1", value)


_HEADER_NAMES = st.sampled_from([b"From", b"from ", b"To", b"Subject", b"DKIM-Signature", b"X"])


@SETTINGS
@given(
    st.lists(st.tuples(_HEADER_NAMES, _RAW), max_size=8),
    st.lists(st.sampled_from([b"from", b"to", b"subject", b"x", b"date"]), max_size=8),
    st.lists(_SIG_PIECES, max_size=20).map(b"".join),
    st.sampled_from([b"simple", b"relaxed"]),
)
def test_signed_header_data_matches_dkimpy(
    headers: list[tuple[bytes, bytes]], include: list[bytes], sig_value: bytes, algorithm: bytes
) -> None:
    fields = dc.ALGORITHMS[algorithm].canonicalize_headers(headers)
    names = [n.lower() for n, _ in fields]
    _compare_hash(algorithm, list(fields), names, include, (b"DKIM-Signature", sig_value))


@SETTINGS
@given(_RAW)
@example(b"")
@example(b"\n")
@example(b"a\n")
@example(b"a\r\r\n\n")
@example(b"a\n\r\nb\n\nc")
def test_blank_line_search_matches_the_regex(raw: bytes) -> None:
    m = canon._BLANK_LINE.search(raw)
    assert canon.blank_line(raw) == (None if m is None else m.span())
