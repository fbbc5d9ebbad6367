"""Measure DKIM verification cost per message: ``.venv/bin/python bench/dkim_verify.py [-n N]``.

Compares dkimpy's own verifier (pure-Python RSA) with mailfort's path (`auth.canon`, dkimpy's
canonicalisation byte for byte without its per-space regex work, + OpenSSL through
`cryptography`), for RSA-2048 and Ed25519, on a ~4 KB
message. DNS is served from memory so only parsing, hashing and the signature check count.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import time
from collections.abc import Callable

import dkim
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.crypto import RSASSA_PKCS1_v1_5_verify, parse_public_key

from mailfort.auth.dkim import (
    ParsedMessage,
    PublicKey,
    dkim_signature_headers,
    parse_key_record,
    verify_dkim,
    verify_signature,
)
from mailfort.dns import Resolver

BODY = b"".join(
    b"Line %04d of a plain text message body, about seventy characters.\r\n" % i for i in range(45)
)
MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Date: Tue, 1 Jul 2025 10:00:00 +0000\r\n"
    b"Message-ID: <bench.1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n" + BODY
)


class _MemoryResolver(Resolver):
    def __init__(self, records: dict[str, bytes]) -> None:
        super().__init__()
        self.records = {
            name: [
                dns.rdata.from_text(
                    dns.rdataclass.IN,
                    dns.rdatatype.TXT,
                    " ".join(
                        '"' + text[i : i + 200].decode() + '"' for i in range(0, len(text), 200)
                    ),
                )
            ]
            for name, text in records.items()
        }

    async def query(self, name: str, rtype: str) -> list[dns.rdata.Rdata]:
        return self.records.get(name.lower(), [])


def _per_call(fn: Callable[[], object], n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=500, help="iterations per measurement")
    n: int = ap.parse_args().n

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    rsa_pub = base64.b64encode(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_seed = base64.b64encode(
        ed_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    ed_pub = base64.b64encode(
        ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    records = {
        "rsa._domainkey.example.com": b"v=DKIM1; k=rsa; p=" + rsa_pub,
        "ed._domainkey.example.com": b"v=DKIM1; k=ed25519; p=" + ed_pub,
    }
    signed = {
        "rsa-2048": dkim.sign(
            MESSAGE, b"rsa", b"example.com", rsa_pem, canonicalize=(b"relaxed", b"relaxed")
        )
        + MESSAGE,
        "ed25519": dkim.sign(
            MESSAGE,
            b"ed",
            b"example.com",
            ed_seed,
            signature_algorithm=b"ed25519-sha256",
            canonicalize=(b"relaxed", b"relaxed"),
        )
        + MESSAGE,
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip("."))

    resolver = _MemoryResolver(records)
    print(f"message {len(MESSAGE)} bytes, {n} iterations, times per message in ms")
    for label, msg in signed.items():
        assert dkim.verify(msg, dnsfunc=dnsfunc)
        selector = "rsa" if label == "rsa-2048" else "ed"
        key = parse_key_record(records[f"{selector}._domainkey.example.com"])
        assert isinstance(key, PublicKey)

        def ours_sync(msg: bytes = msg, key: PublicKey = key) -> None:
            parsed = ParsedMessage.parse(msg)
            header = dkim_signature_headers(parsed)[0]
            tags = dkim.util.parse_tag_value(header[1])
            include = [h.strip().lower() for h in tags[b"h"].split(b":")]
            verify_signature(parsed, tags, include, header, key)

        async def ours_loop(msg: bytes = msg) -> float:
            await verify_dkim(resolver, msg)
            start = time.perf_counter()
            for _ in range(n):
                await verify_dkim(resolver, msg)
            return (time.perf_counter() - start) / n * 1000

        def with_dkimpy(msg: bytes = msg) -> None:
            assert dkim.verify(msg, dnsfunc=dnsfunc)

        dkimpy_ms = _per_call(with_dkimpy, n)
        sync_ms = _per_call(ours_sync, n)
        loop_ms = asyncio.run(ours_loop())
        print(
            f"{label:9s} dkimpy.verify {dkimpy_ms:6.3f} | mailfort verify_signature "
            f"{sync_ms:6.3f} | mailfort verify_dkim (incl. key parse, async) {loop_ms:6.3f}"
        )
    # The signature check alone, without parsing or canonicalisation.
    pub = rsa_key.public_key()
    sig = rsa_key.sign(b"x", padding.PKCS1v15(), hashes.SHA256())
    pk = parse_public_key(base64.b64decode(rsa_pub))

    def pure_python() -> None:
        assert RSASSA_PKCS1_v1_5_verify(hashlib.sha256(b"x"), sig, pk)

    def openssl() -> None:
        pub.verify(sig, b"x", padding.PKCS1v15(), hashes.SHA256())

    print(
        f"RSA-2048 signature check alone: dkimpy {_per_call(pure_python, n * 4):6.3f} | "
        f"cryptography {_per_call(openssl, n * 4):6.3f}"
    )


if __name__ == "__main__":
    main()
