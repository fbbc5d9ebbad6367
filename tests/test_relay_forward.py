"""The forwarder's pure parts: the From rewrite after a DMARC refusal, the one answer for
the sender, the signatures, and the read-through MTA-STS cache."""

from __future__ import annotations

import asyncio
import email
import email.policy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailfort.directory import dkimkeys
from mailfort.directory.service import SigningKey
from mailfort.relay.forward import (
    Forwarder,
    Target,
    _Result,
    rewrite_from,
    sign_and_seal,
)
from mailfort.relay.mtasts import (
    CachedPolicy,
    MemoryPolicyCache,
    ReadThroughPolicyCache,
    parse_policy,
)

ALIAS = "fwd@example.test"


def headers(message: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(message, policy=email.policy.default)  # type: ignore[return-value]


def test_rewrite_keeps_the_author_for_replies() -> None:
    original = b"From: Sam <sam@strict.test>\r\nSubject: hi\r\n\r\nbody\r\n"
    out = rewrite_from(original, ALIAS)
    msg = headers(out)
    assert msg["From"].addresses[0].addr_spec == ALIAS
    assert msg["From"].addresses[0].display_name == f"Sam via {ALIAS}"
    assert msg["X-Original-From"] == "Sam <sam@strict.test>"
    assert msg["Reply-To"] == "Sam <sam@strict.test>"
    assert out.endswith(b"\r\n\r\nbody\r\n") and msg["Subject"] == "hi"


def test_rewrite_keeps_an_existing_reply_to_and_unfolds_a_folded_from() -> None:
    original = (
        b"Subject: hi\r\nFrom: =?utf-8?q?S=C3=A4m?=\r\n <sam@strict.test>\r\n"
        b"Reply-To: list@strict.test\r\n\r\nbody\r\n"
    )
    msg = headers(rewrite_from(original, ALIAS))
    assert msg["From"].addresses[0].display_name == f"Säm via {ALIAS}"
    assert msg.get_all("Reply-To") == ["list@strict.test"]
    assert len(msg.get_all("From")) == 1


def test_rewrite_without_from_changes_nothing() -> None:
    original = b"Subject: no author\r\n\r\nbody\r\n"
    assert rewrite_from(original, ALIAS) == original


@given(st.binary(max_size=400))
def test_rewrite_never_raises(data: bytes) -> None:
    rewrite_from(data, ALIAS)


def result(code: int, webhook: bool = False, detail: str = "") -> _Result:
    return _Result(Target("x@remote.test", ALIAS, webhook=webhook), code, detail)


@pytest.mark.parametrize(
    ("results", "skipped", "code"),
    [
        ([result(250), result(250)], 0, 250),
        ([result(250), result(451)], 0, 451),  # the sender retries; bob is remembered
        ([result(550, detail="5.1.1 no such user")], 0, 550),
        ([result(550)], 1, 250),  # one target had accepted on an earlier attempt
        ([result(250), result(550)], 0, 250),
        ([result(451), result(421, webhook=True)], 0, 421),
        ([], 2, 250),  # a retry that finds everything done
    ],
)
def test_one_answer_for_the_transaction(results: list[_Result], skipped: int, code: int) -> None:
    assert Forwarder._answer(results, skipped).code == code


def test_permanent_refusal_passes_the_enhanced_code_but_not_the_text() -> None:
    reply = Forwarder._answer([result(550, detail="5.2.2 bob@remote.test is over quota")], 0)
    assert str(reply).startswith("550 5.2.2 ") and "bob" not in str(reply)


def keys() -> list[SigningKey]:
    out = []
    for algorithm in dkimkeys.ALGORITHMS:
        new = dkimkeys.generate(algorithm, f"s-{algorithm}")
        out.append(SigningKey("example.test", new.selector, new.algorithm, new.private))
    return out


def test_signatures_and_seal_are_added_on_top() -> None:
    ar = b"mx.example.test;\r\n\tspf=pass smtp.mailfrom=sender.test;\r\n\tarc=none"
    message = b"Authentication-Results: " + ar + b"\r\nFrom: s@sender.test\r\n\r\nbody\r\n"
    out = sign_and_seal(message, keys(), ar, "none")
    assert out.endswith(message)
    added = out[: -len(message)]
    assert added.startswith(b"ARC-Seal: i=1;")
    assert b"ARC-Message-Signature: i=1;" in added
    assert b"ARC-Authentication-Results: i=1; mx.example.test" in added
    assert added.count(b"DKIM-Signature:") == 2


def test_a_chain_at_its_limit_still_gets_dkim_but_no_new_seal() -> None:
    sets = b"".join(
        b"ARC-Seal: i=%d; a=rsa-sha256; cv=pass; d=x.test; s=s; b=AA\r\n" % i for i in range(1, 51)
    )
    message = sets + b"From: sam@sender.test\r\nSubject: s\r\n\r\nbody\r\n"
    out = sign_and_seal(message, keys(), b"mx.example.test; arc=pass", "pass")
    assert out.count(b"ARC-Seal") == 50 and out.count(b"DKIM-Signature:") == 2


def test_read_through_cache_reads_the_backing_store_once() -> None:
    class Counting(MemoryPolicyCache):
        reads = 0

        async def get(self, domain: str):  # type: ignore[no-untyped-def]
            Counting.reads += 1
            return await super().get(domain)

    now = [0.0]
    backing = Counting()
    cache = ReadThroughPolicyCache(backing, clock=lambda: now[0])

    async def run() -> None:
        for _ in range(5):
            assert await cache.get("remote.test") is None
        assert Counting.reads == 1
        now[0] += ReadThroughPolicyCache.NEGATIVE_SECONDS + 1
        await cache.get("remote.test")
        assert Counting.reads == 2
        # A policy fetched now is written through (a restart keeps it) and served from memory.
        policy = parse_policy("version: STSv1\nmode: enforce\nmx: mx.remote.test\nmax_age: 86400\n")
        await cache.put(CachedPolicy("Remote.Test.", "id1", policy, 0.0))
        assert (await backing.get("remote.test")) is not None
        assert (await cache.get("remote.test")) is not None and Counting.reads == 3
        await cache.delete("remote.test")
        assert await backing.get("remote.test") is None

    asyncio.run(run())
