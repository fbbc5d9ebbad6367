"""Webhook targets: URL checks, the SSRF guard, the JSON payload, and signed delivery to a
real HTTPS receiver (test CA) whose name the loopback DNS server answers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import mailbox
import ssl
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfort.dns import Nameserver, Resolver
from mailfort.relay.contexts import pkix_context
from mailfort.relay.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookRefused,
    WebhookResult,
    address_refusal,
    build_payload,
    check_url,
    deliver,
    sign,
    verify_signature,
)
from test_relay_support import NOW, PKI
from webhook_support import Answer, WebhookReceiver, closed_port, issue_for_address

from conftest_dns import DNSFixture
from corpora import MIME

# A resolver pointed at a closed port: a literal URL must never consult it.
_NO_DNS = Resolver([Nameserver("127.0.0.1", closed_port())], timeout=0.5)
SECRET = b"per-domain webhook secret, 32+ random bytes in practice"
HOST = "hook.example.test"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x01\xfe\xff" * 64


# -- URL syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://hook.example.com/",
        "https://hook.example.com",
        "HTTPS://Hook.Example.COM/in?token=abc&x=%20y",
        "https://hook.example.com:8443/path/to#fragment-never-sent",
        "https://hook.example.com./",
        "https://192.0.2.10/hook",
        "https://[2001:db8::1]:8443/hook",
        "https://xn--bcher-kva.example/",
        "https://a-b.c1.example/",
    ],
)
def test_check_url_accepts(url: str) -> None:
    check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://hook.example.com/",
        "ftp://hook.example.com/",
        "hook.example.com/path",
        "//hook.example.com/",
        "https://",
        "https:///path",
        "https://user:pass@hook.example.com/",
        "https://user@hook.example.com/",
        "https://hook.example.com:0/",
        "https://hook.example.com:65536/",
        "https://hook.example.com:http/",
        "https://hook.example.com/a b",
        "https://hook.example.com/a\tb",
        "https://hook.exa\nmple.com/",
        "https://hook.example.com/\x00",
        "https://bücher.example/",
        "https://hook.example.com/ü",
        "https://exa_mple.com/",
        "https://-bad.example.com/",
        "https://a..b/",
        "https://0x7f.1/",
        "https://2130706433/",
        "https://127.1/",
        "https://127.0.0.01/",
        "https://256.1.1.1/",
        "https://[::1%25eth0]/",
        "https://[fe80::1%eth0]/",
        "https://[::1/",
        "https://[not-v6]/",
        "https://" + "a" * 64 + ".example/",
        "https://example.com/" + "a" * 2100,
        "",
    ],
)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(WebhookRefused):
        check_url(url)


# -- the SSRF guard's address table ------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "refused", "refused_even_if_allowed"),
    [
        ("93.184.215.14", False, False),
        ("8.8.8.8", False, False),
        ("2606:4700::1111", False, False),
        ("127.0.0.1", True, False),
        ("127.255.0.9", True, False),
        ("10.0.0.1", True, False),
        ("172.16.5.4", True, False),
        ("172.31.255.255", True, False),
        ("172.32.0.1", False, False),
        ("192.168.1.1", True, False),
        ("100.64.0.1", True, False),  # CGNAT
        ("100.127.255.254", True, False),
        ("169.254.169.254", True, False),  # cloud metadata
        ("192.0.0.9", True, False),
        ("192.0.2.1", True, False),
        ("198.18.0.1", True, False),
        ("198.51.100.7", True, False),
        ("203.0.113.7", True, False),
        ("240.0.0.1", True, False),
        ("0.0.0.0", True, True),  # noqa: S104 (an address to judge, not to bind)
        ("0.1.2.3", True, True),
        ("224.0.0.1", True, True),
        ("239.255.255.250", True, True),
        ("255.255.255.255", True, True),
        ("::1", True, False),
        ("::", True, True),
        ("fd00::1", True, False),  # ULA
        ("fc00::1", True, False),
        ("fe80::1", True, False),
        ("fec0::1", True, False),
        ("ff02::1", True, True),
        ("2001:db8::1", True, False),
        ("2001::1", True, False),  # Teredo
        ("3fff::1", True, False),
        ("100::1", True, False),  # discard-only
        ("::7f00:1", True, False),  # IPv4-compatible (deprecated)
        ("::ffff:127.0.0.1", True, False),  # IPv4-mapped forms judge the IPv4 address
        ("::ffff:10.1.2.3", True, False),
        ("::ffff:169.254.169.254", True, False),
        ("::ffff:0.0.0.0", True, True),
        ("::ffff:8.8.8.8", False, False),
        ("64:ff9b::a00:1", True, False),  # NAT64 of 10.0.0.1
        ("64:ff9b::808:808", False, False),  # NAT64 of 8.8.8.8
        ("2002:7f00:1::1", True, False),  # 6to4 of 127.0.0.1
        ("2002:808:808::1", False, False),
        ("not an address", True, True),
    ],
)
def test_address_table(address: str, refused: bool, refused_even_if_allowed: bool) -> None:
    assert (address_refusal(address) is not None) is refused
    assert (address_refusal(address, allow_private=True) is not None) is refused_even_if_allowed


# -- signatures -----------------------------------------------------------------------------


def test_signature_recipe() -> None:
    body = b'{"x":1}'
    now = time.time()
    stamp = int(now)
    sig = sign(body, SECRET, stamp)
    assert sig == hmac.new(SECRET, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert verify_signature(body, str(stamp), f"v1={sig}", SECRET)
    assert verify_signature(body, str(stamp), f"v1={'0' * 64}, v1={sig}", SECRET)  # rotation
    assert not verify_signature(body + b" ", str(stamp), f"v1={sig}", SECRET)
    assert not verify_signature(body, str(stamp), f"v1={sig}", b"another secret")
    assert not verify_signature(body, str(stamp + 1), f"v1={sig}", SECRET)
    assert not verify_signature(body, str(stamp), sig, SECRET)  # no version tag
    assert not verify_signature(body, str(stamp), f"v2={sig}", SECRET)
    assert not verify_signature(body, "-1", f"v1={sig}", SECRET)
    assert not verify_signature(body, "１２３", f"v1={sig}", SECRET)  # non-ASCII digits
    # The replay window: five minutes either side of the receiver's clock.
    assert verify_signature(body, str(stamp), f"v1={sig}", SECRET, now=lambda: now + 299)
    assert not verify_signature(body, str(stamp), f"v1={sig}", SECRET, now=lambda: now + 301)
    assert not verify_signature(body, str(stamp), f"v1={sig}", SECRET, now=lambda: now - 301)


# -- the payload ----------------------------------------------------------------------------


def sample_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Zoë Sender <zoe@sender.example>"
    msg["To"] = "alias@fwd.example, Other <other@fwd.example>"
    msg["Cc"] = "undisclosed-recipients:;"
    msg["Reply-To"] = "replies@sender.example"
    msg["Subject"] = "Quarterly report — numbers ✓"
    msg["Date"] = format_datetime(NOW.replace(microsecond=0))
    msg["Message-ID"] = "<report-1@sender.example>"
    msg["In-Reply-To"] = "<earlier@sender.example>"
    msg["X-Custom"] = "kept"
    msg.set_content("Plain body, naïve café.\n")
    msg.add_alternative("<p>HTML body, <b>naïve</b> café.</p>\n", subtype="html")
    html = msg.get_body(preferencelist=("html",))
    assert isinstance(html, EmailMessage)
    html.add_related(PNG, "image", "png", cid="<logo@sender.example>")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="report Q3.pdf")
    return msg.as_bytes()


def payload_of(message: bytes, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "mail_from": "zoe@sender.example",
        "rcpt_to": "alias+tag@fwd.example",
        "alias": "alias@fwd.example",
        "authentication_results": "mx.fwd.example; spf=pass smtp.mailfrom=sender.example",
        "received_at": 1764364800.25,
    }
    args.update(kw)
    body = build_payload(message, **args)
    parsed = json.loads(body.decode("utf-8"))  # strict UTF-8 and valid JSON
    assert isinstance(parsed, dict)
    assert base64.b64decode(parsed["raw"], validate=True) == message
    return parsed


def test_payload_of_multipart_message() -> None:
    message = sample_message()
    p = payload_of(message)
    assert p["version"] == 1
    assert p["envelope"] == {
        "mailFrom": "zoe@sender.example",
        "rcptTo": "alias+tag@fwd.example",
        "alias": "alias@fwd.example",
    }
    assert p["session"] == {
        "sender": "zoe@sender.example",
        "recipient": "alias+tag@fwd.example",
        "alias": "alias@fwd.example",
        "arrivalDate": "2025-11-28T21:20:00.250Z",
        "arrivalTime": 1764364800250,
    }
    assert p["recipients"] == ["alias+tag@fwd.example"]
    assert p["receivedAt"] == "2025-11-28T21:20:00.250Z"
    assert p["authenticationResults"].startswith("mx.fwd.example; spf=pass")
    assert p["subject"] == "Quarterly report — numbers ✓"  # RFC 2047 decoded
    assert p["messageId"] == "<report-1@sender.example>"
    assert p["inReplyTo"] == "<earlier@sender.example>"
    assert p["date"] == NOW.replace(microsecond=0).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )
    assert p["from"] == {
        "value": [{"address": "zoe@sender.example", "name": "Zoë Sender"}],
        "text": "Zoë Sender <zoe@sender.example>",
    }
    assert [a["address"] for a in p["to"]["value"]] == ["alias@fwd.example", "other@fwd.example"]
    assert p["cc"]["value"] == []  # an empty group
    assert p["replyTo"]["value"][0]["address"] == "replies@sender.example"
    headers = p["headers"]
    assert ["X-Custom", "kept"] in headers
    assert ["Subject", "Quarterly report — numbers ✓"] in headers
    assert [h[0] for h in headers][:3] == ["From", "To", "Cc"]  # wire order
    assert p["text"] == "Plain body, naïve café.\n"
    assert p["html"] == "<p>HTML body, <b>naïve</b> café.</p>\n"
    by_type = {a["contentType"]: a for a in p["attachments"]}
    assert set(by_type) == {"image/png", "application/pdf"}
    pdf = by_type["application/pdf"]
    assert pdf["filename"] == "report Q3.pdf"
    assert pdf["contentDisposition"] == "attachment"
    assert pdf["size"] == len(PDF)
    assert base64.b64decode(pdf["content"]) == PDF
    assert pdf["checksum"] == hashlib.sha256(PDF).hexdigest()
    png = by_type["image/png"]
    assert png["contentId"] == "<logo@sender.example>"
    assert base64.b64decode(png["content"]) == PNG
    assert p["attachmentsTruncated"] is False
    assert p["parseDefects"] == []


def test_payload_of_forwarded_message_keeps_it_whole() -> None:
    inner = EmailMessage()
    inner["Subject"] = "inner"
    inner.set_content("inner body\n")
    outer = EmailMessage()
    outer["Subject"] = "outer"
    outer.set_content("see attached\n")
    outer.add_attachment(inner)
    p = payload_of(outer.as_bytes())
    assert p["text"] == "see attached\n"
    (att,) = p["attachments"]
    assert att["contentType"] == "message/rfc822"
    assert b"Subject: inner" in base64.b64decode(att["content"])


def test_payload_of_8bit_and_broken_charsets() -> None:
    # RFC 6532 UTF-8 header, a Latin-1 body labelled as such, an unknown charset, and a
    # header with invalid UTF-8: all become valid UTF-8 text, nothing raises.
    message = (
        b"From: =?utf-8?q?J=C3=BCrgen?= <j@x.example>\r\n"
        b"Subject: Gr\xc3\xbc\xc3\x9fe \xff\xfe\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9\r\n"
        b"--b\r\nContent-Type: text/html; charset=x-no-such-charset\r\n\r\n<p>\xc3\xa9</p>\r\n"
        b"--b--\r\n"
    )
    p = payload_of(message)
    assert p["from"]["value"] == [{"address": "j@x.example", "name": "Jürgen"}]
    assert p["subject"].startswith("Grüße ")
    assert "\ufffd" in p["subject"]
    assert p["text"] == "café"  # the CRLF before a boundary belongs to the boundary
    assert p["html"] is not None and "é" in p["html"]


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        (b"=?utf-8?q?caf=C3=A9?=", "café"),
        (b"=?UTF-8?B?Y2Fmw6k=?=", "café"),
        (b"=?utf-8?b?Y2Fmw6k?=", "café"),  # missing padding
        (b"a =?utf-8?q?b?= c", "a b c"),
        (b"=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # RFC 2047 §6.2: the space goes
        (b"=?utf-8?q?a?=\r\n =?iso-8859-1?q?=E9?=", "aé"),  # folded, charset change
        (b"=?utf-8?q?=C3?= =?utf-8?q?=A9?=", "é"),  # a character split across words
        (b"=?utf-8*en?q?hi?=", "hi"),  # RFC 2231 §5 language
        (b"=?x-unknown?q?abc?=", "abc"),
        (b"=?base64?q?abc?=", "abc"),  # a codec that is not a text encoding
        (b"=?utf-8?x?abc?=", "=?utf-8?x?abc?="),
        (b"=?utf-8?q?a_b?=", "a b"),
        (b"Gr\xc3\xbc\xc3\x9fe", "Grüße"),  # RFC 6532 raw UTF-8
    ],
)
def test_header_decoding(raw: bytes, decoded: str) -> None:
    p = payload_of(b"Subject: " + raw + b"\r\nX-Other: =?utf-8?q?x?=\r\n\r\nbody\r\n")
    assert p["subject"] == decoded
    assert ["X-Other", "x"] in p["headers"]


def test_huge_headers_are_cheap() -> None:
    # The stdlib's structured header parser is quadratic on these (minutes each); the
    # payload decodes them in linear time and leaves the structure alone.
    words = b"=?utf-8?q?ab?= " * 20000
    params = b'a="=?utf-8?q?x?="; ' * 16000
    message = (
        b"Subject: " + words + b"\r\n"
        b"To: " + b"a@b.example, " * 20000 + b"\r\n"
        b"Content-Type: text/plain; " + params + b"\r\n\r\nbody\r\n"
    )
    started = time.monotonic()
    p = payload_of(message)
    assert time.monotonic() - started < 5
    assert p["subject"] == "ab" * 20000
    assert p["to"]["value"] == []  # too long to interpret; the text is there
    assert p["to"]["text"].startswith("a@b.example, a@b.example")
    assert p["text"] == "body\r\n" or p["text"] == "body\n"


def test_payload_of_not_a_message() -> None:
    for junk in (b"", b"\r\n\r\n", b"\x00\xff" * 100, b"no headers at all", b":\r\n:"):
        p = payload_of(junk)
        assert p["subject"] is None and p["from"] is None


def test_attachment_count_is_capped() -> None:
    parts = b"".join(
        b"--b\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n" for _ in range(1100)
    )
    message = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    p = payload_of(message)
    assert len(p["attachments"]) == 1000 and p["attachmentsTruncated"] is True


def test_deep_nesting_does_not_raise() -> None:
    depth = 3000
    head = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    payload_of(b"Subject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\nleaf\r\n")


def corpus_messages() -> Iterator[tuple[str, bytes]]:
    for path in sorted(MIME.rglob("*")):
        if path.is_file() and path.suffix in (".eml", ".msg", ""):
            if path.name.startswith("LICENSE") or path.name == "NOTICE":
                continue
            yield str(path.relative_to(MIME)), path.read_bytes()
    box = mailbox.mbox(str(MIME / "crispin-torture-test.mbox"), create=False)
    for i, item in enumerate(box):
        yield f"crispin#{i}", item.as_bytes()


def test_corpora_never_raise() -> None:
    seen = 0
    for name, message in corpus_messages():
        try:
            p = payload_of(message)
        except Exception as exc:  # name the message that broke it
            raise AssertionError(name) from exc
        assert isinstance(p["headers"], list), name
        seen += 1
    assert seen > 200


_FRAGMENTS = [
    b"\r\n",
    b"\n",
    b" ",
    b"\t",
    b":",
    b";",
    b"=",
    b'"',
    b"<",
    b">",
    b"@",
    b",",
    b"--",
    b"--b",
    b"--b--",
    b"\0",
    b"\xff",
    b"\xed\xa0\x80",  # an encoded surrogate: invalid UTF-8
    b"\xc3\xa9",
    b"=?utf-8?q?x=C3?=",
    b"=?x-unknown?b?////?=",
    b"Content-Type: multipart/mixed; boundary=b",
    b"Content-Type: multipart/alternative; boundary=b",
    b"Content-Type: message/rfc822",
    b"Content-Type: text/plain; charset=bogus",
    b"Content-Type: text/html; charset*=utf-8''%ff",
    b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: quoted-printable",
    b"Content-Transfer-Encoding: x-uuencode",
    b'Content-Disposition: attachment; filename="a\\"b"',
    b"Content-Disposition: attachment; filename*=utf-8''%e9",
    b"Content-ID: <",
    b"From: A <a@b>, g: c@d;",
    b"From: <<>>",
    b"To: <@r:x@y>",
    b'Cc: "unterminated',
    b"Date: Mon, 31 Feb 2025 25:61:61 +9999",
    b"Date: ",
    b"Message-ID: <a@b",
    b"Subject: x",
    b"AAAA====",
]

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(st.binary(max_size=4096))
def test_any_bytes_give_json(data: bytes) -> None:
    payload_of(data)


@SETTINGS
@given(st.lists(st.sampled_from(_FRAGMENTS) | st.binary(max_size=8), max_size=80))
def test_mime_soup_gives_json(pieces: list[bytes]) -> None:
    payload_of(b"".join(pieces))


@SETTINGS
@given(
    st.text(alphabet=st.characters(blacklist_categories=()), max_size=40),
    st.text(alphabet=st.characters(blacklist_categories=()), max_size=40),
    st.floats(min_value=0, max_value=4e9),
)
def test_any_envelope_gives_json(mail_from: str, auth: str, received_at: float) -> None:
    # Lone surrogates included: aiosmtpd hands over surrogate-escaped 8-bit addresses.
    p = payload_of(
        b"Subject: s\r\n\r\nbody\r\n",
        mail_from=mail_from,
        authentication_results=auth,
        received_at=received_at,
    )
    assert isinstance(p["envelope"]["mailFrom"], str)


# -- delivery over real DNS and HTTPS --------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("webhook-pki"))


@pytest.fixture(scope="module")
def _receiver(pki: PKI) -> Iterator[WebhookReceiver]:
    server = WebhookReceiver(pki.server_context(pki.root.issue([HOST]), "hook"), SECRET)
    yield server
    server.close()


@pytest.fixture
def receiver(_receiver: WebhookReceiver, pki: PKI) -> Iterator[WebhookReceiver]:
    _receiver.context = pki.server_context(pki.root.issue([HOST]), "hook")
    _receiver.reset()
    yield _receiver
    _receiver.reset()


@pytest.fixture
def client_context(pki: PKI) -> ssl.SSLContext:
    return pkix_context(pki.ca_file)


def url(receiver: WebhookReceiver, path: str = "/in?token=s3cret", host: str = HOST) -> str:
    return f"https://{host}:{receiver.port}{path}"


async def send(
    dns_server: DNSFixture,
    receiver: WebhookReceiver,
    client_context: ssl.SSLContext,
    *,
    target: str | None = None,
    body: bytes | None = None,
    secret: bytes = SECRET,
    allow_private: bool = True,
    timeout: float = 5.0,
    **kw: Any,
) -> WebhookResult:
    return await deliver(
        target or url(receiver),
        body if body is not None else b'{"hello":"world"}',
        secret,
        resolver=dns_server.resolver,
        allow_private=allow_private,
        ssl_context=client_context,
        timeout=timeout,
        **kw,
    )


async def test_delivers_signed_parsed_message(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    message = sample_message()
    body = build_payload(
        message,
        mail_from="zoe@sender.example",
        rcpt_to="alias@fwd.example",
        alias="alias@fwd.example",
        authentication_results="mx.fwd.example; dkim=pass header.d=sender.example",
        received_at=time.time(),
    )
    result = await send(dns_server, receiver, client_context, body=body)
    assert result.ok and result.status == 200, result
    assert "s3cret" not in result.detail
    (seen,) = receiver.requests
    assert seen.verified  # the documented recipe, applied by the receiver
    assert seen.method == "POST" and seen.path == "/in?token=s3cret"
    assert seen.sni == HOST  # connected to the checked address, SNI on the name
    assert seen.headers["host"] == f"{HOST}:{receiver.port}"
    assert seen.headers["content-type"].startswith("application/json")
    assert TIMESTAMP_HEADER.lower() in seen.headers and SIGNATURE_HEADER.lower() in seen.headers
    assert seen.body == body
    p = seen.payload
    assert p["subject"] == "Quarterly report — numbers ✓"
    assert p["authenticationResults"] == "mx.fwd.example; dkim=pass header.d=sender.example"
    assert p["text"] == "Plain body, naïve café.\n"
    pdf = next(a for a in p["attachments"] if a["filename"] == "report Q3.pdf")
    assert base64.b64decode(pdf["content"]) == PDF
    assert base64.b64decode(p["raw"]) == message
    # One lookup per address family, nothing after the check: no window for rebinding.
    assert sorted(t for name, t, _ in dns_server.queries if name.rstrip(".") == HOST) == [
        "A",
        "AAAA",
    ]


async def test_loopback_refused_without_permission(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    with pytest.raises(WebhookRefused, match="loopback"):
        await send(dns_server, receiver, client_context, allow_private=False)
    assert receiver.requests == []


@pytest.mark.parametrize(
    "records",
    [
        [("A", "10.0.0.1")],
        [("A", "169.254.169.254")],
        [("AAAA", "::1")],
        [("AAAA", "::ffff:7f00:1")],  # ::ffff:127.0.0.1 (dnslib wants hex)
        [("AAAA", "fd12:3456::1")],
        [("A", "100.64.1.1")],
        [("AAAA", "64:ff9b::a9fe:a9fe")],  # NAT64 of 169.254.169.254
        # One public address does not launder a private one: a rebinding name can serve
        # both and let the client pick.
        [("A", "93.184.215.14"), ("A", "192.168.0.10")],
        [("AAAA", "2606:4700::1111"), ("A", "127.0.0.1")],
    ],
)
async def test_private_names_refused(
    dns_server: DNSFixture,
    receiver: WebhookReceiver,
    client_context: ssl.SSLContext,
    records: list[tuple[str, str]],
) -> None:
    dns_server.set_zone({HOST: records})
    with pytest.raises(WebhookRefused):
        await send(dns_server, receiver, client_context, allow_private=False)
    assert receiver.requests == []


@pytest.mark.parametrize(
    "target",
    ["https://127.0.0.1/", "https://10.0.0.1:8443/", "https://[::1]/", "https://[::ffff:a00:1]/"],
)
async def test_private_literals_refused_without_lookup(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext, target: str
) -> None:
    dns_server.set_zone({})
    with pytest.raises(WebhookRefused):
        await send(dns_server, receiver, client_context, target=target, allow_private=False)
    assert dns_server.queries == []


async def test_refusals_need_no_network(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    for target in (f"http://{HOST}:{receiver.port}/", f"https://u:p@{HOST}:{receiver.port}/"):
        with pytest.raises(WebhookRefused):
            await send(dns_server, receiver, client_context, target=target)
    assert dns_server.queries == [] and receiver.requests == []


async def test_literal_address_verifies_against_the_certificate(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext
) -> None:
    # With private targets allowed an address literal connects, and the certificate must
    # name that address: ours names only the host, so the request never goes out.
    result = await send(
        dns_server, receiver, client_context, target=f"https://127.0.0.1:{receiver.port}/"
    )
    assert not result.ok and "certificate" in result.detail
    assert receiver.requests == []


async def test_ipv6_literal_with_permission(pki: PKI, client_context: ssl.SSLContext) -> None:
    # An address literal: no lookup, certificate checked against the address, and the
    # Host header in brackets (RFC 3986 §3.2.2).
    server = WebhookReceiver(
        pki.server_context(issue_for_address(pki.root, "::1"), "v6"), SECRET, host="::1"
    )
    try:
        target = f"https://[::1]:{server.port}/v6"
        with pytest.raises(WebhookRefused, match="loopback"):
            await deliver(target, b"{}", SECRET, resolver=_NO_DNS, ssl_context=client_context)
        result = await deliver(
            target,
            b"{}",
            SECRET,
            resolver=_NO_DNS,
            ssl_context=client_context,
            allow_private=True,
        )
        assert result.ok, result
        (seen,) = server.requests
        assert seen.verified and seen.headers["host"] == f"[::1]:{server.port}"
        assert seen.sni is None  # RFC 6066 §3: no address in SNI
    finally:
        server.close()


@pytest.mark.parametrize("status", [500, 503, 404, 401, 429])
async def test_error_status_is_failure(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext, status: int
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    receiver.answer = Answer(status=status, body=b"secret internal error text")
    result = await send(dns_server, receiver, client_context)
    assert not result.ok and result.status == status
    assert result.detail == f"webhook {HOST}: HTTP {status}"


async def test_any_2xx_is_success_and_body_is_ignored(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    receiver.answer = Answer(status=202, body=b"x" * 5_000_000)
    result = await send(dns_server, receiver, client_context)
    assert result.ok and result.status == 202


async def test_redirect_not_followed(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    receiver.answer = Answer(status=307, headers=[("Location", "https://169.254.169.254/")])
    result = await send(dns_server, receiver, client_context)
    assert not result.ok and result.status == 307
    assert "redirect" in result.detail
    assert len(receiver.requests) == 1


async def test_wrong_secret_or_stale_timestamp_rejected_by_receiver(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    result = await send(dns_server, receiver, client_context, secret=b"not the domain's secret")
    assert not result.ok and result.status == 401
    result = await send(dns_server, receiver, client_context, now=lambda: time.time() - 3600)
    assert not result.ok and result.status == 401
    assert [r.verified for r in receiver.requests] == [False, False]


async def test_timeout(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    receiver.answer = Answer(hang=True)
    started = time.monotonic()
    result = await send(dns_server, receiver, client_context, timeout=1.0)
    assert time.monotonic() - started < 3
    assert not result.ok and result.status is None
    assert result.detail == f"webhook {HOST}: no response within 1 s"


async def test_connection_refused(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    target = f"https://{HOST}:{closed_port()}/"
    result = await send(dns_server, receiver, client_context, target=target)
    assert not result.ok and result.status is None
    assert result.detail == f"webhook {HOST}: connection failed"


async def test_certificate_for_another_name(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext, pki: PKI
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    receiver.context = pki.server_context(pki.root.issue(["other.example.test"]), "other")
    result = await send(dns_server, receiver, client_context)
    assert not result.ok and "certificate" in result.detail
    assert receiver.requests == []


async def test_certificate_from_untrusted_ca(
    dns_server: DNSFixture, receiver: WebhookReceiver, client_context: ssl.SSLContext, pki: PKI
) -> None:
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    receiver.context = pki.server_context(pki.other.issue([HOST]), "untrusted")
    result = await send(dns_server, receiver, client_context)
    assert not result.ok and "certificate" in result.detail
    assert receiver.requests == []


async def test_system_trust_by_default(dns_server: DNSFixture, receiver: WebhookReceiver) -> None:
    # Without a context the system CAs decide, and they do not know our test CA.
    dns_server.set_zone({HOST: [("A", "127.0.0.1")]})
    result = await deliver(
        url(receiver), b"{}", SECRET, resolver=dns_server.resolver, allow_private=True
    )
    assert not result.ok and "certificate" in result.detail
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("entry", "detail"),
    [("SERVFAIL", "address lookup failed"), (("TXT", "no addresses here"), "no address")],
)
async def test_dns_failures(
    dns_server: DNSFixture,
    receiver: WebhookReceiver,
    client_context: ssl.SSLContext,
    entry: Any,
    detail: str,
) -> None:
    dns_server.set_zone({HOST: [entry]})
    result = await send(dns_server, receiver, client_context)
    assert not result.ok and result.status is None
    assert result.detail == f"webhook {HOST}: {detail}"


def test_corpus_dir_present() -> None:
    # The corpus tests above are only as good as the corpus being where we expect it.
    assert (MIME / "flanker").is_dir() and (MIME / "crispin-torture-test.mbox").is_file()
