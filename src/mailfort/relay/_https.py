"""A small HTTPS/1.1 client: one request per connection, for MTA-STS, TLS-RPT and webhooks.

Why not a general HTTP client: both uses need the host name resolved through
`mailfort.dns.Resolver` (so a test DNS server or the operator's resolver decides the
address) while SNI and certificate verification stay on the name, never follow
redirects (RFC 8461 §3.3), cap the body size and the total time, and never reuse a
connection. h11 parses the protocol (status line, headers, chunked or sized bodies);
the socket work is asyncio's.

Webhook delivery resolves and vets the addresses itself (its SSRF guard) and passes them
in ``addresses``, so the connection goes to exactly the address that was checked: a
second lookup here could be answered differently (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import h11

from mailfort.dns import Resolver, TemporaryDNSError

_READ_CHUNK = 65536


class HTTPSError(Exception):
    """The request did not produce a complete response (DNS, TCP, TLS, HTTP framing)."""


class CertificateError(HTTPSError):
    """The server's certificate did not verify (chain, name or validity)."""


class BodyTooLarge(HTTPSError):
    """The response body exceeded the caller's limit."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; a repeated header's values comma-joined
    body: bytes

    def media_type(self) -> str:
        """The Content-Type without parameters, lower-cased ("" when absent)."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def request(
    method: str,
    host: str,
    path: str,
    *,
    resolver: Resolver,
    ssl_context: ssl.SSLContext,
    port: int = 443,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = 60.0,
    max_body: int = 65536,
    addresses: Sequence[str] | None = None,
    truncate_body: bool = False,
) -> Response:
    """Send one request to ``https://host:port/path`` and return the full response.

    Every address of ``host`` is tried in the resolver's order (IPv6 first) until one
    connects; ``timeout`` bounds the whole exchange, lookups included. ``addresses``,
    when given, replaces the lookup: only those are tried, in that order, while SNI and
    certificate verification stay on ``host``. With ``truncate_body`` a body over
    ``max_body`` is cut there and the response returned at once (the rest is never
    read) instead of raising `BodyTooLarge`: for callers that need only the status.
    """
    try:
        async with asyncio.timeout(timeout):
            if addresses is None:
                try:
                    addresses = await resolver.addresses(host)
                except TemporaryDNSError as exc:
                    raise HTTPSError(f"address lookup for {host} failed") from exc
            if not addresses:
                raise HTTPSError(f"{host} has no address")
            last: HTTPSError | None = None
            for address in addresses:
                try:
                    reader, writer = await asyncio.open_connection(
                        address, port, ssl=ssl_context, server_hostname=host
                    )
                except ssl.SSLCertVerificationError as exc:
                    last = CertificateError(f"{host} [{address}]: {exc.verify_message}")
                    continue
                except (OSError, ssl.SSLError) as exc:
                    last = HTTPSError(f"{host} [{address}]: {exc}")
                    continue
                try:
                    return await _exchange(
                        reader,
                        writer,
                        method,
                        host,
                        port,
                        path,
                        body,
                        headers,
                        max_body,
                        truncate_body,
                    )
                except BaseException:
                    # No TLS close_notify exchange with a peer that misbehaved or when
                    # time is up: that wait is what the timeout is there to bound.
                    writer.transport.abort()
                    raise
                finally:
                    writer.close()
                    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                        await asyncio.wait_for(writer.wait_closed(), 1.0)
            assert last is not None
            raise last
    except TimeoutError as exc:
        raise HTTPSError(f"{host}: no complete response within {timeout:g} s") from exc


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    host: str,
    port: int,
    path: str,
    body: bytes,
    extra: Sequence[tuple[str, str]],
    max_body: int,
    truncate_body: bool,
) -> Response:
    conn = h11.Connection(our_role=h11.CLIENT)
    # RFC 9110 §7.2 / RFC 3986 §3.2.2: an IPv6 literal goes in brackets in Host.
    bracketed = f"[{host}]" if ":" in host else host
    authority = bracketed if port == 443 else f"{bracketed}:{port}"
    # A plain client: no cookies, no caching (RFC 8461 §3.3 forbids HTTP caching), and a
    # product name without a version, which tells a server nothing worth attacking.
    head = [("Host", authority), ("User-Agent", "mailfort"), ("Connection", "close")]
    if body or method.upper() == "POST":
        head.append(("Content-Length", str(len(body))))
    try:
        out = conn.send(h11.Request(method=method, target=path, headers=[*head, *extra]))
        if body:
            out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
        out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
        writer.write(out)
        await writer.drain()

        status = 0
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(_READ_CHUNK))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    key = name.decode("ascii").lower()
                    text = value.decode("latin-1")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
                if truncate_body and max_body == 0:
                    return Response(status, headers, b"")
                length = headers.get("content-length", "")
                if not truncate_body and length.isdigit() and int(length) > max_body:
                    raise BodyTooLarge(f"{host}: body of {length} octets over {max_body}")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                chunks.append(bytes(event.data))
                if size > max_body:
                    if truncate_body:
                        return Response(status, headers, b"".join(chunks)[:max_body])
                    raise BodyTooLarge(f"{host}: body over {max_body} octets")
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, headers, b"".join(chunks))
            else:  # ConnectionClosed or PAUSED before the end of the message
                raise HTTPSError(f"{host}: connection closed before the response ended")
    except h11.ProtocolError as exc:
        raise HTTPSError(f"{host}: malformed HTTP: {exc}") from exc
    except ssl.SSLError as exc:
        raise HTTPSError(f"{host}: TLS error: {exc}") from exc
    except OSError as exc:
        raise HTTPSError(f"{host}: {exc}") from exc
