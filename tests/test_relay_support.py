"""Real counterparts for the relay tests (no test functions here).

- `PKI`: a test CA (and an untrusted one) made with `cryptography`, issuing leaf and
  intermediate certificates on demand, written as PEM files servers can load.
- `HTTPSServer`: `http.server` behind TLS on 127.0.0.1, serving per-path canned answers
  and recording every request (the MTA-STS policy host, an ``https:`` rua endpoint).
- `SMTPStub`: an SMTP server on 127.0.0.1 that speaks just enough (EHLO, STARTTLS,
  NOOP, QUIT) for a real client to negotiate TLS with a chosen certificate chain.

Servers run in threads so that they outlive any one event loop.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass
class Issued:
    cert: x509.Certificate
    key: PrivateKey
    chain: list[x509.Certificate] = field(default_factory=list)  # issuers above, no root

    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def chain_der(self, *, with_root: x509.Certificate | None = None) -> list[bytes]:
        certs = [self.cert, *self.chain] + ([with_root] if with_root is not None else [])
        return [c.public_bytes(serialization.Encoding.DER) for c in certs]

    def write(
        self, directory: Path, name: str, *, with_root: x509.Certificate | None = None
    ) -> tuple[Path, Path]:
        """PEM files (chain, key) for ``SSLContext.load_cert_chain``."""
        cert_path = directory / f"{name}.crt"
        key_path = directory / f"{name}.key"
        certs = [self.cert, *self.chain] + ([with_root] if with_root is not None else [])
        cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
        key_path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


def _key(kind: str) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


class CA:
    cert: x509.Certificate

    def __init__(self, name: str, *, kind: str = "ec", parent: CA | None = None) -> None:
        self.name = name
        self.key = _key(kind)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name = parent.cert.subject if parent else subject
        signer = parent.key if parent else self.key
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
        )
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                critical=False,
            )
        self.cert = builder.sign(signer, hashes.SHA256())
        self.parent = parent

    def chain_above(self) -> list[x509.Certificate]:
        """This CA and its parents below the root (what a server sends)."""
        out: list[x509.Certificate] = []
        ca: CA | None = self
        while ca is not None and ca.parent is not None:
            out.append(ca.cert)
            ca = ca.parent
        return out

    def root(self) -> CA:
        ca = self
        while ca.parent is not None:
            ca = ca.parent
        return ca

    def issue(
        self,
        names: Sequence[str],
        *,
        kind: str = "ec",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        common_name: str | None = None,
        san: bool = True,
    ) -> Issued:
        key = _key(kind)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name or (names[0] if names else "x"))]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - dt.timedelta(days=1))
            .not_valid_after(not_after or NOW + dt.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if san and names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert, key, self.chain_above())

    def write_pem(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


@dataclass
class PKI:
    directory: Path
    root: CA
    other: CA  # a CA nobody trusts
    ca_file: Path

    @classmethod
    def create(cls, directory: Path) -> PKI:
        directory.mkdir(parents=True, exist_ok=True)
        root = CA("Mailfort Test Root")
        other = CA("Untrusted Test Root")
        return cls(directory, root, other, root.write_pem(directory / "ca.pem"))

    def server_context(self, issued: Issued, name: str) -> ssl.SSLContext:
        cert, key = issued.write(self.directory, name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx


# -- HTTPS --------------------------------------------------------------------------------


@dataclass
class Canned:
    status: int = 200
    body: bytes = b""
    headers: Sequence[tuple[str, str]] = (("Content-Type", "text/plain"),)
    hang: bool = False  # accept the request, never answer


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    sni: str | None


class HTTPSServer:
    """Threaded HTTPS on loopback; ``context`` may be swapped between requests. Requests are
    answered from ``routes`` by path, or by ``respond`` when given (it sees each request
    as recorded)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        respond: Callable[[SeenRequest], Canned] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.context = context
        self.respond = respond
        self.routes: dict[str, Canned] = {}
        self.requests: list[SeenRequest] = []
        self._release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                sni = getattr(self.connection, "sni_seen", None)
                seen = SeenRequest(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    sni,
                )
                owner.requests.append(seen)
                if owner.respond is not None:
                    canned = owner.respond(seen)
                else:
                    canned = owner.routes.get(self.path, Canned(404, b"not found"))
                if canned.hang:
                    owner._release.wait(10)
                    return
                self.send_response(canned.status)
                for name, value in canned.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(canned.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                with contextlib.suppress(OSError):  # a client that left early
                    self.wfile.write(canned.body)

            do_GET = _serve
            do_POST = _serve

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request: Any, client_address: Any) -> None:
                return  # a client that refused our certificate or left early

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = self.socket.accept()
                ctx = owner.context
                seen: dict[str, str | None] = {}

                def remember(obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
                    seen["sni"] = name

                ctx.sni_callback = remember
                tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                tls.settimeout(5)
                # A client that refuses our certificate fails the handshake; the handler
                # then fails fast on the dead socket.
                with contextlib.suppress(ssl.SSLError, OSError):
                    tls.do_handshake()
                tls.sni_seen = seen.get("sni")  # type: ignore[attr-defined]
                return tls, addr

        self._server = Server((host, 0), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def route(self, path: str, canned: Canned) -> None:
        self.routes[path] = canned

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


# -- SMTP with STARTTLS -----------------------------------------------------------------------


class SMTPStub:
    """Enough SMTP for a STARTTLS negotiation: greeting, EHLO, STARTTLS, NOOP, QUIT."""

    def __init__(self, context: ssl.SSLContext | None, *, starttls: bool = True) -> None:
        self.context = context
        self.starttls = starttls and context is not None
        self.handshakes: list[str] = []  # "ok" or the server-side error
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                conn: Any = self.connection
                conn.settimeout(5)
                reader: Callable[[], bytes] = conn.makefile("rb").readline
                conn.sendall(b"220 stub.test ESMTP\r\n")
                while True:
                    line = reader()
                    if not line:
                        return
                    verb = line.strip().split(b" ", 1)[0].upper()
                    if verb in (b"EHLO", b"HELO"):
                        ext = (
                            b"250-STARTTLS\r\n"
                            if owner.starttls and not isinstance(conn, ssl.SSLSocket)
                            else b""
                        )
                        conn.sendall(b"250-stub.test\r\n" + ext + b"250 8BITMIME\r\n")
                    elif verb == b"STARTTLS" and owner.starttls and owner.context is not None:
                        conn.sendall(b"220 go ahead\r\n")
                        try:
                            conn = owner.context.wrap_socket(conn, server_side=True)
                        except (ssl.SSLError, OSError) as exc:
                            owner.handshakes.append(f"error: {exc}")
                            return
                        owner.handshakes.append("ok")
                        reader = conn.makefile("rb").readline
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    elif verb == b"NOOP":
                        conn.sendall(b"250 ok\r\n")
                    else:
                        conn.sendall(b"502 not here\r\n")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                return

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
