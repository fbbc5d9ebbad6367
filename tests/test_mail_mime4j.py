"""Structure and decoded content against Apache mime4j's expected results.

mime4j's `.xml` files give each message's entity tree and `_decoded_*.txt`
its decoded leaf bodies. Our parser follows Dovecot, not mime4j; where they
disagree (listed below, each checked against the Dovecot reference) the
Dovecot answer wins.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mailfort.mail import Flags, Part, UnknownCTEError, parse_message, to_crlf
from mailfort.mail.section import decode_part

from corpora import MIME

BASE = MIME / "mime4j" / "core" / "src" / "test" / "resources"
pytestmark = pytest.mark.skipif(not BASE.exists(), reason="corpora not present")

# Tree shapes where Dovecot (and so we) differ from mime4j.
SHAPE_DIFFERENCES = {
    # Dovecot stops reading parameters at the empty one: no boundary.
    "mimetools-testmsgs/double-semicolon.xml",
    # A base64 message/rfc822 is not decoded before parsing (RFC 2046 §5.2.1).
    "mimetools-testmsgs/multi-2gifs-base64.xml",
    "testmsgs/bad-newlines-multiple-parts-base64.xml",
    "testmsgs/base64encoded-rfc822message-nested.xml",
    # Boundaries are cut to 80 characters, so more lines match.
    "testmsgs/very-long-boundary.xml",
    "testmsgs/very-very-long-boundary.xml",
}
# mime4j's .xml files that are not well-formed XML (raw control characters).
BROKEN_XML = {"mimetools-testmsgs/2002_06_12_doublebound.xml", "mimetools-testmsgs/twopart.xml"}
DECODED_DIFFERENCES = {
    "mimetools-testmsgs/double-semicolon_decoded_1_1.txt",
    "mimetools-testmsgs/double-semicolon_decoded_1_2.txt",
    "mimetools-testmsgs/multi-2gifs-base64_decoded_1_1_1.txt",
    "testmsgs/bad-newlines-multiple-parts-base64_decoded_1_1_1.txt",
    "testmsgs/base64encoded-rfc822message-nested_decoded_1_1_1.txt",
    "testmsgs/base64encoded-rfc822message_decoded_1_1.txt",
    "testmsgs/very-long-boundary_decoded_1_1.txt",
    "testmsgs/very-very-long-boundary_decoded_1_1.txt",
    # "x-gzip64" is an unknown CTE: BINARY answers UNKNOWN-CTE (RFC 3516 §4.3).
    "mimetools-testmsgs/x-gzip64_decoded_1.txt",
    # Lines without ":" before the blank line are header lines to Dovecot.
    "testmsgs/malformedHeaderStartsBody-nocrlfcrlf_decoded_1.txt",
    "testmsgs/malformedHeaderStartsBody-noheader_decoded_1.txt",
    # mime4j numbers a synthetic empty part that Dovecot doesn't have.
    "testmsgs/missing-inner-boundary_decoded_1_2_1.txt",
    "testmsgs/multipartemptypart_decoded_1_2.txt",
}

Shape = str | tuple[object, ...]


def xml_shape(el: ET.Element) -> Shape:
    kids = [c for c in el if c.tag in ("multipart", "message", "body")]
    if not kids or kids[0].tag == "body":
        return "body"
    c = kids[0]
    if c.tag == "message":
        return ("message", xml_shape(c))
    return ("multipart", tuple(xml_shape(bp) for bp in c if bp.tag == "body-part"))


def our_shape(p: Part) -> Shape:
    if p.flags & Flags.MULTIPART:
        return ("multipart", tuple(our_shape(c) for c in p.children))
    if p.flags & Flags.MESSAGE_RFC822 and p.children:
        return ("message", our_shape(p.children[0]))
    return "body"


def _xml_cases() -> list[Path]:
    if not BASE.exists():
        return []
    return sorted(
        x
        for x in BASE.rglob("*.xml")
        if not x.name.endswith("_decoded.xml") and x.with_suffix(".msg").exists()
    )


def _rel(p: Path) -> str:
    return p.relative_to(BASE).as_posix()


XML_CASES = _xml_cases()


@pytest.mark.parametrize("xml", XML_CASES, ids=[_rel(x) for x in XML_CASES])
def test_structure(xml: Path) -> None:
    name = _rel(xml)
    if name in BROKEN_XML:
        pytest.skip("expected file is not well-formed XML")
    # Trusted, vendored test data (no entity expansion in these files).
    expected = xml_shape(ET.fromstring(xml.read_bytes()))  # noqa: S314
    got = our_shape(parse_message(to_crlf(xml.with_suffix(".msg").read_bytes())).root)
    if name in SHAPE_DIFFERENCES:
        assert got != expected
    else:
        assert got == expected


def _resolve(root: Part, comps: list[str]) -> Part | None:
    # mime4j numbers an encapsulated message as its own level "1".
    p: Part | None = root
    for c in comps:
        n = int(c)
        if p is None:
            return None
        if p.flags & Flags.MULTIPART:
            p = p.children[n - 1] if n <= len(p.children) else None
        elif p.flags & Flags.MESSAGE_RFC822 and p.children and n == 1:
            p = p.children[0]
        else:
            return None
    return p


DECODED = sorted(BASE.rglob("*_decoded_*.txt")) if BASE.exists() else []


@pytest.mark.parametrize("txt", DECODED, ids=[_rel(t) for t in DECODED])
def test_decoded_leaf(txt: Path) -> None:
    m = re.match(r"(.*)_decoded_([\d_]+)\.txt$", txt.name)
    assert m is not None
    msg_file = txt.with_name(m.group(1) + ".msg")
    if not msg_file.exists():
        pytest.skip("no message")
    raw = to_crlf(msg_file.read_bytes())
    part = _resolve(parse_message(raw).root, m.group(2).split("_")[1:])
    try:
        got = decode_part(raw, part) if part is not None else None
    except UnknownCTEError:
        got = None
    expected = txt.read_bytes().replace(b"\r\n", b"\n")
    same = got is not None and got.replace(b"\r\n", b"\n") == expected
    assert same != (_rel(txt) in DECODED_DIFFERENCES)
