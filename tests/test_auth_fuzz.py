"""Hostile input must never crash the checks: every verdict carries a valid header."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import authres
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfort.auth.results import authenticate, remove_forged_results
from test_auth_dkim import SIGNED
from test_auth_results import _football_zone

EXAMPLES = int(os.environ.get("MAILFORT_FUZZ_EXAMPLES", "60"))
ALPHABET = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b"\t",
        b":",
        b";",
        b"=",
        b"(",
        b")",
        b'"',
        b"\\",
        b"@",
        b"\x00",
        b"\xff",
        b"\xc3\xa9",
        b"a",
        b"From: x@y\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=; s=; h=from; b=; bh=\r\n",
        b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=x; s=y; b=\r\n",
        b"Authentication-Results: mx.mailfort.example; spf=pass\r\n",
    ]
)


@st.composite
def mutated(draw: Any) -> bytes:
    msg = bytearray(SIGNED)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(msg)))
        cut = draw(st.integers(0, 8))
        msg[pos : pos + cut] = draw(ALPHABET)
    return bytes(msg)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    raw=mutated(),
    mail_from=st.sampled_from(["", "<>", "joe@football.example.com", "x@", "@@", "é@ü.example"]),
)
def test_mutated_messages_never_crash(dns_server: Any, raw: bytes, mail_from: str) -> None:
    dns_server.set_zone(_football_zone())
    verdict = asyncio.run(
        authenticate(
            raw, "192.0.2.25", "h.example", mail_from, dns_server.resolver, "mx.mailfort.example"
        )
    )
    parsed = authres.AuthenticationResultsHeader.parse(
        verdict.header.decode("ascii").rstrip("\r\n")
    )
    assert parsed.authserv_id == "mx.mailfort.example"
    again, _ = remove_forged_results(verdict.stamped(), "mx.mailfort.example")
    assert again == verdict.message
