"""Webhook forwarding targets: a signed JSON POST of the parsed message to an HTTPS URL.

An alias may forward to ``https://…`` instead of a mailbox. The relay builds the body once
with `build_payload` and hands it to `deliver` for each webhook target, inside the SMTP
session: a 2xx answer is an accepted delivery, anything else is a failure the sender
hears about (the relay answers 421 so the sending server retries).

Signature (how a receiver verifies a request)
---------------------------------------------
Every POST carries two headers::

    X-Mailfort-Timestamp: 1764364800                  (Unix seconds when it was signed)
    X-Mailfort-Signature: v1=5257a869e7ec…            (lower-case hex)

where the hex is ``HMAC-SHA256(key=secret, msg=timestamp + "." + raw_body)``; the
secret is the domain's webhook key, ``timestamp`` the header's decimal text and
``raw_body`` the request body exactly as received (before any JSON parsing). A receiver:

1. reads the raw body bytes and both headers; refuses the request if either is missing;
2. refuses it when the timestamp is more than 5 minutes from its own clock (replay
   window; a captured request cannot be replayed later since the timestamp is signed);
3. computes the HMAC above and compares it in constant time (``hmac.compare_digest``)
   with each ``v1=`` value of the comma-separated signature header (more than one
   appears while a secret is being rotated);
4. only then parses the JSON. It should answer 2xx quickly and do slow work afterwards.

In Python::

    ts = request.headers["X-Mailfort-Timestamp"]
    if not ts.isdigit() or abs(time.time() - int(ts)) > 300:
        reject()
    mac = hmac.new(secret, ts.encode() + b"." + raw_body, hashlib.sha256).hexdigest()
    sigs = [s.strip()[3:] for s in request.headers["X-Mailfort-Signature"].split(",")
            if s.strip().startswith("v1=")]
    if not any(hmac.compare_digest(mac, s) for s in sigs):
        reject()

`verify_signature` does exactly this. Deduplicate on the message (``messageId``, or a
hash of ``raw``): a delivery that timed out on our side may have been processed on
yours, and the sending server retries after our 421.

SSRF guard
----------
A webhook URL comes from a user (alias settings, or a DNS TXT record anyone can publish),
so it must not reach the operator's own network. `deliver` resolves the host itself,
refuses the whole URL when *any* address is loopback, private (RFC 1918, ULA),
link-local, shared (CGNAT), documentation, benchmarking, reserved, or an IPv4-mapped,
NAT64 or 6to4 form of one (unless the operator allows private targets), and then
connects to exactly the addresses it checked, with SNI and certificate verification on
the host name: no second lookup that a rebinding DNS server could answer differently.
Multicast, broadcast and unspecified addresses are refused even with ``allow_private``:
nothing serves HTTPS there. Redirects are not followed (a 3xx is a failure), and the
response body is never read beyond its headers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import email.message
import email.policy
import functools
import hashlib
import hmac
import ipaddress
import itertools
import json
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.headerregistry import Address, BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.parser import BytesParser
from functools import partial
from typing import Any, TypeVar

from mailfort.dns import Resolver, TemporaryDNSError

from . import _https
from .contexts import pkix_context

TIMESTAMP_HEADER = "X-Mailfort-Timestamp"
SIGNATURE_HEADER = "X-Mailfort-Signature"
SIGNATURE_VERSION = "v1"
REPLAY_WINDOW = 300.0  # seconds a receiver should accept a timestamp either side of now
PAYLOAD_VERSION = 1

MAX_URL_LENGTH = 2048
# Enough for any real message; a crafted one with thousands of tiny parts would otherwise
# make the JSON several times the message's size. `raw` still carries everything.
MAX_ATTACHMENTS = 1000
MAX_HEADERS = 2000
MAX_DEFECTS = 50
MAX_PARSED_HEADER = 4096  # characters; see _BoundedHeaders
HEADER_PARSE_SECONDS = 1.0

T = TypeVar("T")
D = TypeVar("D")


@dataclass(frozen=True)
class WebhookResult:
    ok: bool
    status: int | None  # HTTP status, None if no response
    detail: str  # short, safe for logs and SMTP replies (no secrets, no body)


class WebhookRefused(ValueError):
    """The URL is not allowed: not https, bad syntax, or a host with a refused address."""


# -- URL syntax --------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class _Target:
    host: str  # lower-case name, or the literal address without brackets
    port: int
    target: str  # path and query, as sent in the request line
    literal: IPAddress | None


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_DOTTED_QUAD = re.compile(r"[0-9]+(?:\.[0-9]+){3}")


def check_url(url: str) -> None:
    """Refuse (`WebhookRefused`) a webhook URL that is not acceptable by syntax alone.

    Allowed: ``https://host[:port]/path?query`` with an ASCII host name (A-labels for
    IDNs), a dotted-quad IPv4 or a bracketed IPv6 literal. Refused: other schemes,
    credentials in the URL (the signature authenticates us; a password in a URL ends up
    in logs), spaces, control or non-ASCII characters (percent-encode them), and hosts
    that only some parsers read as addresses (``0x7f.1``, ``2130706433``). Addresses
    are vetted later, by `deliver`, since a name's addresses are known only then.
    """
    _parse_url(url)


def _parse_url(url: str) -> _Target:
    if not isinstance(url, str) or not url:
        raise WebhookRefused("empty webhook URL")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"webhook URL longer than {MAX_URL_LENGTH} characters")
    # urlsplit silently drops tabs and newlines (WHATWG); what we check must be what we send.
    if not _VISIBLE_ASCII.fullmatch(url):
        raise WebhookRefused(
            "webhook URL must be ASCII without spaces or control characters (percent-encode)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused("malformed webhook URL") from exc
    if parts.scheme.lower() != "https":
        raise WebhookRefused("webhook URL must use https://")
    if "@" in parts.netloc:
        raise WebhookRefused("credentials in a webhook URL are not allowed")
    if port == 0:
        raise WebhookRefused("webhook URL has port 0")
    hostpart = parts.netloc.rsplit(":", 1)[0] if not parts.netloc.endswith("]") else parts.netloc
    if hostpart.startswith("["):
        inner = hostpart[1:-1] if hostpart.endswith("]") else ""
        try:
            v6 = ipaddress.IPv6Address(inner)
        except ValueError as exc:
            raise WebhookRefused("malformed IPv6 literal in webhook URL") from exc
        if v6.scope_id is not None:
            raise WebhookRefused("zone identifiers are not allowed in a webhook URL")
        host: str = v6.compressed
        literal: IPAddress | None = v6
    else:
        host = hostpart.lower().removesuffix(".")
        literal = None
        if _DOTTED_QUAD.fullmatch(host):
            try:
                literal = ipaddress.IPv4Address(host)
            except ValueError as exc:  # an octet over 255 or with a leading zero
                raise WebhookRefused("malformed IPv4 literal in webhook URL") from exc
        else:
            _check_hostname(host)
    path = parts.path or "/"
    if not path.startswith("/"):
        raise WebhookRefused("malformed webhook URL path")
    target = f"{path}?{parts.query}" if parts.query else path
    return _Target(host, port or 443, target, literal)


def _check_hostname(host: str) -> None:
    if not host:
        raise WebhookRefused("webhook URL has no host")
    if len(host) > 253:
        raise WebhookRefused("webhook host name too long")
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise WebhookRefused("webhook host is not a valid host name (use A-labels for IDNs)")
    # WHATWG URL parsers read a numeric last label as an IPv4 address in some notation
    # (``0x7f.1``, ``127.1``, ``2130706433``); no real host name ends that way.
    last = labels[-1]
    if last.isdigit() or re.fullmatch(r"0x[0-9a-f]*", last):
        raise WebhookRefused("webhook host looks like a numeric address")


# -- address vetting ---------------------------------------------------------------------


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Never reachable as a web server anywhere: refused even when private targets are allowed.
_NEVER_V4 = _nets("0.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32")
_NEVER_V6 = _nets("::/128", "ff00::/8")

# IANA IPv4 Special-Purpose Address Registry (RFC 6890 and updates): everything not
# globally reachable, spelled out rather than trusting `is_global`, whose tables have
# changed between Python releases.
_NON_PUBLIC_V4: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("127.0.0.0/8"), "loopback"),
    (ipaddress.ip_network("10.0.0.0/8"), "private"),
    (ipaddress.ip_network("172.16.0.0/12"), "private"),
    (ipaddress.ip_network("192.168.0.0/16"), "private"),
    (ipaddress.ip_network("100.64.0.0/10"), "shared (CGNAT)"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local"),
    (ipaddress.ip_network("192.0.0.0/24"), "reserved"),  # IETF protocol assignments
    (ipaddress.ip_network("192.0.2.0/24"), "documentation"),
    (ipaddress.ip_network("198.51.100.0/24"), "documentation"),
    (ipaddress.ip_network("203.0.113.0/24"), "documentation"),
    (ipaddress.ip_network("192.88.99.0/24"), "reserved"),  # former 6to4 relay anycast
    (ipaddress.ip_network("198.18.0.0/15"), "benchmarking"),
    (ipaddress.ip_network("240.0.0.0/4"), "reserved"),
)

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NON_PUBLIC_V6: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("::1/128"), "loopback"),
    (ipaddress.ip_network("fc00::/7"), "private (ULA)"),
    (ipaddress.ip_network("fe80::/10"), "link-local"),
    (ipaddress.ip_network("fec0::/10"), "site-local"),
    (ipaddress.ip_network("2001::/23"), "reserved"),  # IETF protocol assignments, Teredo
    (ipaddress.ip_network("2001:db8::/32"), "documentation"),
    (ipaddress.ip_network("3fff::/20"), "documentation"),  # RFC 9637
    (ipaddress.ip_network("5f00::/16"), "reserved"),  # SRv6 SIDs, RFC 9602
)


def address_refusal(address: str | IPAddress, *, allow_private: bool = False) -> str | None:
    """Why a webhook must not connect to ``address`` ("loopback", "private", …), or None.

    With ``allow_private`` only addresses nothing can serve HTTPS on are refused
    (unspecified, multicast, broadcast). Unparseable text is refused too.
    """
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return "unparseable"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            return "scoped"
        # Forms that carry an IPv4 address inside: judge that address, since it is
        # where the packets end up (mapped: this host's own IPv4 stack; NAT64: via the
        # translator; 6to4: via a relay).
        if ip in _MAPPED and ip.ipv4_mapped is not None:
            return address_refusal(ip.ipv4_mapped, allow_private=allow_private)
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            return address_refusal(embedded, allow_private=allow_private)
        if ip in _SIX_TO_FOUR and ip.sixtofour is not None:
            return address_refusal(ip.sixtofour, allow_private=allow_private)
        if any(ip in net for net in _NEVER_V6):
            return "multicast" if ip.is_multicast else "unspecified"
        if allow_private:
            return None
        for net, why in _NON_PUBLIC_V6:
            if ip in net:
                return why
        # Everything outside 2000::/3 is unallocated or special (RFC 4291 §2.4,
        # IANA IPv6 Address Space registry): IPv4-compatible, discard-only, …
        if ip not in _GLOBAL_UNICAST_V6:
            return "reserved"
        return None
    if any(ip in net for net in _NEVER_V4):
        if ip.is_multicast:
            return "multicast"
        return "broadcast" if int(ip) == 0xFFFFFFFF else "unspecified"
    if allow_private:
        return None
    for net, why in _NON_PUBLIC_V4:
        if ip in net:
            return why
    return None


def _connect_form(ip: IPAddress) -> str:
    # An IPv4-mapped AAAA reaches the IPv4 stack anyway; saying so keeps the connection
    # working on hosts with IPV6_V6ONLY set.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


# -- signing -----------------------------------------------------------------------------


def sign(body: bytes, secret: bytes, timestamp: int) -> str:
    """The ``v1`` signature: hex HMAC-SHA256 over ``f"{timestamp}."`` + body."""
    return hmac.new(secret, f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()


def verify_signature(
    body: bytes,
    timestamp: str,
    signature: str,
    secret: bytes,
    *,
    now: Callable[[], float] = time.time,
    tolerance: float = REPLAY_WINDOW,
) -> bool:
    """The receiver's check from the module docstring, for receivers written in Python."""
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 15:
        return False
    if abs(now() - int(timestamp)) > tolerance:
        return False
    expected = sign(body, secret, int(timestamp))
    prefix = f"{SIGNATURE_VERSION}="
    found = False
    for item in signature.split(","):
        item = item.strip()
        # Compare every candidate: no early exit that times which one matched.
        if item.startswith(prefix) and hmac.compare_digest(expected, item[len(prefix) :]):
            found = True
    return found


# -- payload -----------------------------------------------------------------------------

# Headers written back as received: refolding would send them through the structured
# parser, unbounded (see _BoundedHeaders).
_WIRE_POLICY = email.policy.default.clone(linesep="\r\n", refold_source="none")


def build_payload(
    message: bytes,
    *,
    mail_from: str,
    rcpt_to: str,
    alias: str,
    authentication_results: str,
    received_at: float,
) -> bytes:
    """The JSON body (UTF-8) for a webhook: envelope, our authentication results, the
    parsed message and the raw message (base64). Never raises on any message.

    Field names follow Forward Email's webhook (itself nodemailer's ``mailparser``)
    where there is an equivalent, so receivers written for it need few changes::

        version                 1
        envelope                {mailFrom, rcptTo, alias}
        session, recipients     the envelope again under Forward Email's names:
                                {sender, recipient, alias, arrivalDate, arrivalTime}
        receivedAt              ISO 8601 UTC, when we received the message
        authenticationResults   our Authentication-Results header value
        headers                 [[name, value], ...] in order, values decoded (RFC 2047)
        subject, messageId, inReplyTo, references, date (ISO 8601 or null)
        from, to, cc, replyTo   {value: [{address, name}], text} or null
        text, html              the body chosen for each (multipart/alternative aware)
        attachments             [{filename, contentType, contentDisposition, contentId,
                                  size, checksum (SHA-256 hex), content (base64)}]
        attachmentsTruncated    true when more than MAX_ATTACHMENTS parts were left out
        raw                     the message exactly as received, base64
        parseDefects            names of the MIME defects Python's parser noticed

    Anything that cannot be parsed is null (or empty); ``raw`` is always complete.
    A header over `MAX_PARSED_HEADER` characters is decoded (``headers``, ``text`` of an
    address field) but not interpreted: no address list, and a part with such a
    Content-Type counts as text/plain (see `_BoundedHeaders`).
    CPU-bound (about 0.1 s per MB): run it in a thread (``asyncio.to_thread``).
    """
    arrival = dt.datetime.fromtimestamp(received_at, dt.UTC)
    payload: dict[str, Any] = {
        "version": PAYLOAD_VERSION,
        "envelope": {
            "mailFrom": _clean(mail_from),
            "rcptTo": _clean(rcpt_to),
            "alias": _clean(alias),
        },
        "session": {
            "sender": _clean(mail_from),
            "recipient": _clean(rcpt_to),
            "alias": _clean(alias),
            "arrivalDate": _iso(arrival),
            "arrivalTime": round(received_at * 1000),
        },
        "recipients": [_clean(rcpt_to)],
        "receivedAt": _iso(arrival),
        "authenticationResults": _clean(authentication_results),
    }
    payload.update(_parsed_fields(message))
    payload["raw"] = base64.b64encode(message).decode("ascii")
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _empty_fields() -> dict[str, Any]:
    return {
        "headers": [],
        "subject": None,
        "messageId": None,
        "inReplyTo": None,
        "references": None,
        "date": None,
        "from": None,
        "to": None,
        "cc": None,
        "replyTo": None,
        "text": None,
        "html": None,
        "attachments": [],
        "attachmentsTruncated": False,
        "parseDefects": [],
    }


class _BoundedHeaders(HeaderRegistry):
    """The default header registry with a ceiling on the time it may spend.

    The stdlib's structured header parser is slow and worse than linear on some inputs
    (a 4 KB Content-Type of many parameters takes ~0.1 s, 300 KB takes minutes), and
    the MIME parser and accessors fetch such headers again and again. Values over
    `MAX_PARSED_HEADER` characters, and every value once `HEADER_PARSE_SECONDS` are
    spent, are interpreted as empty: a part loses its declared type, a header its
    parsed addresses. `headers` and `raw` in the payload still carry them in full.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spent = 0.0
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        # The stdlib builds a new class on every lookup (~40 µs); the MIME parser
        # looks up Content-Type several times per part.
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(key)
        return cls

    def __call__(self, name: str, value: str) -> BaseHeader:
        if len(value) > MAX_PARSED_HEADER or self.spent > HEADER_PARSE_SECONDS:
            value = ""
        started = time.perf_counter()
        try:
            return super().__call__(name, value)
        finally:
            self.spent += time.perf_counter() - started


def _parsed_fields(message: bytes) -> dict[str, Any]:
    out = _empty_fields()
    # A policy per message: the registry's time budget belongs to this message only.
    policy = email.policy.default.clone(header_factory=_BoundedHeaders())
    try:
        msg = BytesParser(policy=policy).parsebytes(message)
    except Exception:  # the parser is lenient, but a fallback costs nothing
        return out
    # Each field on its own: one malformed header must not cost the bodies, and so on.
    # The stdlib parser is lenient but its lazy header and content accessors are not.
    headers = _guard(partial(_headers, msg), [])
    out["headers"] = headers
    first: dict[str, str] = {}
    for name, value in headers:
        first.setdefault(name.lower(), value)
    out["subject"] = first.get("subject")
    out["messageId"] = first.get("message-id")
    out["inReplyTo"] = first.get("in-reply-to")
    out["references"] = first.get("references")
    out["date"] = _guard(partial(_date, msg), None)
    for key, name in (("from", "from"), ("to", "to"), ("cc", "cc"), ("replyTo", "reply-to")):
        if name in first:
            out[key] = {
                "value": _guard(partial(_addresses, msg, name), []),
                "text": first[name],
            }
    text_part = _guard(partial(msg.get_body, preferencelist=("plain",)), None)
    html_part = _guard(partial(msg.get_body, preferencelist=("html",)), None)
    if isinstance(text_part, EmailMessage):
        out["text"] = _guard(partial(_text, text_part), None)
    if isinstance(html_part, EmailMessage):
        out["html"] = _guard(partial(_text, html_part), None)
    bodies = {id(p) for p in (text_part, html_part) if p is not None}
    attachments, truncated = _guard(partial(_attachments, msg, bodies), ([], False))
    out["attachments"] = attachments
    out["attachmentsTruncated"] = truncated
    out["parseDefects"] = _guard(partial(_defects, msg), [])
    return out


def _guard(fn: Callable[[], T], default: D) -> T | D:
    try:
        return fn()
    except Exception:  # RecursionError included: deeply nested MIME
        return default


def _headers(msg: EmailMessage) -> list[list[str]]:
    """The top-level header fields in order, unfolded, encoded words decoded.

    Decoded here in linear time rather than by the structured parser (see
    `_BoundedHeaders`), so every header arrives readable however long it is.
    """
    out: list[list[str]] = []
    for name, raw in itertools.islice(msg.raw_items(), MAX_HEADERS):
        value = _clean(str(raw)).replace("\r", "").replace("\n", "")
        out.append([_clean(name), _decode_words(value).strip()])
    return out


# RFC 2047 §2 encoded-word; the charset may carry an RFC 2231 §5 language suffix.
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")


def _decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words anywhere in ``value``.

    Adjacent encoded words are joined without the whitespace between them (§6.2), and
    their octets are decoded together while the charset stays the same: mailers split
    multi-octet characters across words. Words that do not decode stay as they are.
    """
    out: list[str] = []
    run: list[bytes] = []
    run_charset = ""
    after_word = False
    pos = 0

    def flush() -> None:
        if run:
            out.append(_decode_octets(b"".join(run), run_charset))
            run.clear()

    for match in _ENCODED_WORD.finditer(value):
        gap = value[pos : match.start()]
        pos = match.end()
        charset, encoding, text = match.group(1).lower(), match.group(2), match.group(3)
        octets = _word_octets(encoding, text)
        if octets is None:
            flush()
            out.append(gap + match.group(0))
            after_word = False
            continue
        if not (after_word and gap.strip(" \t") == ""):
            flush()
            out.append(gap)
        elif charset != run_charset:
            flush()
        run.append(octets)
        run_charset = charset
        after_word = True
    flush()
    out.append(value[pos:])
    return "".join(out)


def _word_octets(encoding: str, text: str) -> bytes | None:
    try:
        if encoding in "bB":
            return base64.b64decode(text + "=" * (-len(text) % 4))
        return binascii.a2b_qp(text.encode("utf-8"), header=True)
    except (binascii.Error, ValueError):
        return None


def _decode_octets(data: bytes, charset: str) -> str:
    try:
        return _clean(data.decode(charset, "replace"))
    except Exception:  # unknown, or not a text codec ("base64", "rot13", ...)
        return data.decode("utf-8", "replace")


def _date(msg: EmailMessage) -> str | None:
    header = msg.get("date")
    when = getattr(header, "datetime", None)
    if not isinstance(when, dt.datetime):
        return None
    if when.tzinfo is not None:
        return _iso(when.astimezone(dt.UTC))
    return when.isoformat()  # "-0000": local time of an unknown zone (RFC 5322 §3.3)


def _addresses(msg: EmailMessage, name: str) -> list[dict[str, str]]:
    header = msg.get(name)
    found: tuple[Address, ...] = getattr(header, "addresses", ())
    return [{"address": _clean(a.addr_spec), "name": _clean(a.display_name)} for a in found]


def _text(part: EmailMessage) -> str:
    content = _guard(part.get_content, None)
    if isinstance(content, str):
        return _clean(content)
    # An unknown charset or a broken transfer encoding: UTF-8 is the likeliest guess.
    data = part.get_payload(decode=True)
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else ""


def _leaves(msg: EmailMessage) -> Iterator[EmailMessage]:
    """Non-multipart parts in order; an attached message/* is one leaf, not opened."""
    stack: list[EmailMessage] = [msg]
    while stack:
        part = stack.pop()
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            children = part.get_payload()
            if isinstance(children, list):
                stack.extend(reversed([c for c in children if isinstance(c, EmailMessage)]))
            continue
        yield part


def _part_bytes(part: EmailMessage) -> bytes:
    if part.is_multipart():  # message/rfc822 and kin: the enclosed message(s) rendered
        inner = part.get_payload()
        if isinstance(inner, list):
            return b"".join(
                m.as_bytes(policy=_WIRE_POLICY)
                for m in inner
                if isinstance(m, email.message.Message)
            )
        return b""
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _attachments(msg: EmailMessage, bodies: set[int]) -> tuple[list[dict[str, Any]], bool]:
    out: list[dict[str, Any]] = []
    for part in _leaves(msg):
        if id(part) in bodies:
            continue
        if len(out) >= MAX_ATTACHMENTS:
            return out, True
        entry: dict[str, Any] | None = _guard(partial(_attachment, part), None)
        out.append(entry or _unreadable())
    return out, False


def _attachment(part: EmailMessage) -> dict[str, Any]:
    data = _guard(partial(_part_bytes, part), b"")
    cid = _guard(partial(part.get, "content-id"), None)
    return {
        "filename": _guard(partial(_filename, part), None),
        "contentType": _guard(part.get_content_type, "application/octet-stream"),
        "contentDisposition": _guard(part.get_content_disposition, None),
        "contentId": _clean(str(cid)).strip() if cid is not None else None,
        "size": len(data),
        "checksum": hashlib.sha256(data).hexdigest(),
        "content": base64.b64encode(data).decode("ascii"),
    }


def _unreadable() -> dict[str, Any]:
    return {
        "filename": None,
        "contentType": "application/octet-stream",
        "contentDisposition": None,
        "contentId": None,
        "size": 0,
        "checksum": hashlib.sha256(b"").hexdigest(),
        "content": "",
    }


def _defects(msg: EmailMessage) -> list[str]:
    names: list[str] = []
    for part in msg.walk():
        for defect in part.defects:
            name = type(defect).__name__
            if name not in names:
                names.append(name)
                if len(names) >= MAX_DEFECTS:
                    return names
    return names


def _filename(part: EmailMessage) -> str | None:
    name = part.get_filename()
    return None if name is None else _clean(name)


def _clean(text: str) -> str:
    """Text safe to encode as UTF-8: undecoded octets (surrogate escapes) read as
    UTF-8 (RFC 6532 headers), anything still invalid as U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped octet
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _iso(when: dt.datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- delivery ----------------------------------------------------------------------------


@functools.cache
def _default_context() -> ssl.SSLContext:
    # Loading the system CA bundle takes milliseconds; one context serves every request.
    return pkix_context()


async def deliver(
    url: str,
    body: bytes,
    secret: bytes,
    *,
    resolver: Resolver,
    allow_private: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
    now: Callable[[], float] = time.time,
) -> WebhookResult:
    """POST ``body`` (from `build_payload`) to ``url``, signed with ``secret``.

    Raises `WebhookRefused` before connecting anywhere when the URL fails `check_url`
    or its host has an address the SSRF guard refuses (see the module docstring).
    Otherwise returns a result: ``ok`` only for a 2xx answer. DNS failures, connection,
    TLS and certificate failures, timeouts (``timeout`` bounds lookup and exchange
    together), redirects and error statuses are ``ok=False`` with a fixed-form
    ``detail`` that names the host at most: URL paths often carry tokens.
    """
    target = _parse_url(url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    host = target.host
    if target.literal is not None:
        found: list[IPAddress] = [target.literal]
    else:
        try:
            async with asyncio.timeout(timeout):
                texts = await resolver.addresses(host)
        except (TemporaryDNSError, TimeoutError):
            return WebhookResult(False, None, f"webhook {host}: address lookup failed")
        found = []
        for text in texts:
            try:
                found.append(ipaddress.ip_address(text))
            except ValueError:
                raise WebhookRefused(f"webhook host {host} has an unparseable address") from None
        if not found:
            return WebhookResult(False, None, f"webhook {host}: no address")
    for ip in found:
        why = address_refusal(ip, allow_private=allow_private)
        if why is not None:
            raise WebhookRefused(f"webhook host {host} has a {why} address")

    stamp = int(now())
    headers = [
        ("Content-Type", "application/json; charset=utf-8"),
        (TIMESTAMP_HEADER, str(stamp)),
        (SIGNATURE_HEADER, f"{SIGNATURE_VERSION}={sign(body, secret, stamp)}"),
    ]
    remaining = max(deadline - loop.time(), 0.001)
    try:
        response = await _https.request(
            "POST",
            host,
            target.target,
            resolver=resolver,
            ssl_context=ssl_context or _default_context(),
            port=target.port,
            body=body,
            headers=headers,
            timeout=remaining,
            max_body=0,
            truncate_body=True,
            addresses=[_connect_form(ip) for ip in found],
        )
    except _https.CertificateError:
        return WebhookResult(False, None, f"webhook {host}: TLS certificate not valid")
    except _https.HTTPSError as exc:
        if isinstance(exc.__cause__, TimeoutError):
            return WebhookResult(False, None, f"webhook {host}: no response within {timeout:g} s")
        return WebhookResult(False, None, f"webhook {host}: connection failed")
    status = response.status
    if 200 <= status < 300:
        return WebhookResult(True, status, f"webhook {host}: HTTP {status}")
    if 300 <= status < 400:
        return WebhookResult(
            False, status, f"webhook {host}: HTTP {status} (redirects are not followed)"
        )
    return WebhookResult(False, status, f"webhook {host}: HTTP {status}")
