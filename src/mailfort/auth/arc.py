"""ARC chain validation (RFC 8617 §5.2) for the inbound MX.

dkimpy's ``ARC.verify`` does the chain logic: grouping sets by i=, structure checks, the
order of AMS and AS validation and the cv= rules. It passes all 171 cases of the ValiMail
validation suite. We subclass it only to swap its per-signature step (``verify_sig``): keys
come from one concurrent prefetch on our async resolver instead of blocking lookups, and
signatures are checked by `mailfort.auth.dkim.verify_signature` (OpenSSL, RFC 8301 limits)
instead of dkimpy's pure-Python RSA. A key lookup that failed temporarily is remembered so
the caller can tell "chain broken" from "DNS trouble".

The MX uses `ARCResult.sealers` / `ARCResult.latest_sealer` to decide whether a configured
forwarder vouches for a message (RFC 8617 §7.2: trust is a local decision).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final, Literal

import dkim
import dkim.util

from mailfort.auth.dkim import (
    INLINE_LIMIT,
    KeyLookup,
    KeyProblem,
    ParsedMessage,
    SignatureError,
    fetch_keys,
    key_name,
    verify_signature,
)
from mailfort.dns import Resolver

CV = Literal["none", "pass", "fail"]

# RFC 8617 §4.2.1 allows i=1..50. Each set costs two key lookups and two signature checks,
# so we validate at most this many and call longer chains failed (local policy).
MAX_SETS: Final = 16

_ARC_HEADERS: Final = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")

# dkimpy logs failure details, header contents included, at error level. They go to a
# logger of our own that does not propagate, so message data does not reach the logs; the
# reason we need is returned to the caller anyway.
_dkimpy_log = logging.getLogger("mailfort.auth.arc.dkimpy")
_dkimpy_log.addHandler(logging.NullHandler())
_dkimpy_log.propagate = False


@dataclass(frozen=True)
class ARCSet:
    """One ARC set as found in the message (RFC 8617 §4.1)."""

    instance: int
    seal_domain: str  # ARC-Seal d=
    seal_selector: str
    ams_domain: str  # ARC-Message-Signature d=
    cv: str  # the cv= this sealer claimed
    aar: str  # ARC-Authentication-Results value, unfolded


@dataclass(frozen=True)
class ARCResult:
    cv: CV
    sets: tuple[ARCSet, ...]  # oldest (i=1) first
    reason: str
    temperror: bool = False  # a key lookup failed temporarily; a retry may pass
    oldest_pass: int | None = None  # RFC 8617 §5.2 step 6 (cv=pass only); 0: all AMS pass

    @property
    def sealers(self) -> tuple[str, ...]:
        """Sealing domains, i=1 first."""
        return tuple(s.seal_domain for s in self.sets)

    @property
    def latest_sealer(self) -> str | None:
        return self.sets[-1].seal_domain if self.sets else None

    def vouched_by(self, trusted: Collection[str]) -> ARCSet | None:
        """The newest set when the chain passes and its sealer is one of ``trusted``
        (lower-case domains): its AAR records what that forwarder saw."""
        if self.cv != "pass" or not self.sets:
            return None
        newest = self.sets[-1]
        return newest if newest.seal_domain in trusted else None


class _ARC(dkim.ARC):  # type: ignore[misc]  # dkimpy is untyped
    def __init__(self, msg: ParsedMessage, keys: dict[str, KeyLookup]) -> None:
        super().__init__(None, logger=_dkimpy_log, minkey=1024)
        self.headers = msg.headers
        self.body = msg.body
        self._msg = msg
        self._keys = keys
        self.temporary = False

    def verify_sig(
        self,
        sig: dict[bytes, bytes],
        include_headers: list[bytes],
        sig_header: tuple[bytes, bytes],
        dnsfunc: Any,
    ) -> bool:
        """dkimpy's hook for one AMS or AS; True when it verifies."""
        name = key_name(_tag(sig, b"s"), _tag(sig, b"d"))
        key = self._keys.get(name)
        if key is None:
            return False
        if isinstance(key, KeyProblem):
            if key.result == "temperror":
                self.temporary = True
            return False
        try:
            verify_signature(self._msg, sig, include_headers, sig_header, key)
        except SignatureError:
            return False
        return True


# instance -> lower-case header name -> its tags
_Sets = dict[int, dict[bytes, dict[bytes, bytes]]]


def _tag(tags: dict[bytes, bytes], name: bytes) -> str:
    return tags.get(name, b"").decode("utf-8", "replace").strip().lower()


def _collect_sets(
    msg: ParsedMessage,
) -> tuple[_Sets, set[str]]:
    """Tags of each ARC header by instance, and the key names they point at."""
    by_instance: _Sets = {}
    names: set[str] = set()
    for name, value in msg.headers:
        lname = name.lower()
        if lname not in _ARC_HEADERS:
            continue
        if lname == b"arc-authentication-results":
            head = value.split(b";", 1)[0]
            tags = {b"i": head.split(b"=", 1)[-1].strip(), b"_value": value}
        else:
            try:
                tags = dkim.util.parse_tag_value(value)
            except dkim.util.InvalidTagValueList:
                continue
            names.add(key_name(_tag(tags, b"s"), _tag(tags, b"d")))
        try:
            instance = int(tags.get(b"i", b""))
        except ValueError:
            continue
        by_instance.setdefault(instance, {})[lname] = tags
    return by_instance, names


def _describe(by_instance: _Sets) -> tuple[ARCSet, ...]:
    out = []
    for i in sorted(by_instance):
        parts = by_instance[i]
        seal = parts.get(b"arc-seal", {})
        ams = parts.get(b"arc-message-signature", {})
        aar = parts.get(b"arc-authentication-results", {}).get(b"_value", b"")
        out.append(
            ARCSet(
                instance=i,
                seal_domain=_tag(seal, b"d"),
                seal_selector=_tag(seal, b"s"),
                ams_domain=_tag(ams, b"d"),
                cv=_tag(seal, b"cv"),
                aar=" ".join(aar.decode("utf-8", "replace").split()),
            )
        )
    return tuple(out)


def _oldest_pass(results: list[dict[str, Any]]) -> int:
    """RFC 8617 §5.2 step 6: walking down from the newest, the oldest instance whose AMS
    still validates with all newer ones; 0 when every AMS validates."""
    oldest = 0
    for r in results:  # dkimpy lists newest first
        if not r.get("ams-valid"):
            oldest = int(r["instance"]) + 1
            break
    return oldest


async def verify_arc_parsed(
    resolver: Resolver,
    msg: ParsedMessage,
    *,
    max_sets: int = MAX_SETS,
    inline_limit: int = INLINE_LIMIT,
) -> ARCResult:
    by_instance, names = _collect_sets(msg)
    sets = _describe(by_instance)
    if not any(n.lower() in _ARC_HEADERS for n, _ in msg.headers):
        return ARCResult("none", (), "no ARC sets")
    if len(by_instance) > max_sets or len(names) > 2 * max_sets:
        return ARCResult("fail", sets, f"more than {max_sets} ARC sets (local limit)")
    keys = await fetch_keys(resolver, names)
    arc = _ARC(msg, keys)

    def run() -> tuple[Any, list[dict[str, Any]], str]:
        try:
            cv, results, reason = arc.verify(dnsfunc=None)
        except dkim.DKIMException as exc:
            return dkim.CV_Fail, [], str(exc)
        except (IndexError, KeyError, ValueError, TypeError):
            # dkimpy indexes into what it parsed (e.g. the raw AMS matching " i=N;") and
            # can trip over hostile layouts; a set it cannot read does not validate.
            return dkim.CV_Fail, [], "malformed ARC set"
        return cv, results, str(reason)

    size = len(msg.body) + sum(len(v) for _, v in msg.headers)
    cv, results, reason = run() if size <= inline_limit else await asyncio.to_thread(run)
    if cv == dkim.CV_Pass:
        return ARCResult("pass", sets, "", oldest_pass=_oldest_pass(results))
    if cv == dkim.CV_None:
        return ARCResult("none", sets, reason)
    # cv None from dkimpy: an earlier sealer recorded cv=fail, so the chain ended there
    # (RFC 8617 §5.2 step 2); that is a failed chain for us as well.
    return ARCResult("fail", sets, reason, temperror=arc.temporary)


async def verify_arc(resolver: Resolver, message: bytes) -> ARCResult:
    try:
        msg = ParsedMessage.parse(message)
    except dkim.MessageFormatError:
        return ARCResult("fail", (), "malformed header section")
    return await verify_arc_parsed(resolver, msg)


__all__ = ["ARCResult", "ARCSet", "verify_arc", "verify_arc_parsed"]
