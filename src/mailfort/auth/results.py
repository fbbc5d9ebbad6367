"""One Authentication-Results header per message (RFC 8601) and the `authenticate` entry
point the inbound MX calls.

`authenticate` verifies the message exactly as received (signers signed those bytes),
then hands back a copy without any Authentication-Results field that claims our
authserv-id (RFC 8601 §5: such a field from outside is forged), plus our own header to
prepend.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import dkim as dkimpy

from mailfort.auth.arc import ARCResult, verify_arc_parsed
from mailfort.auth.canon import first_blank_lf
from mailfort.auth.dkim import (
    INLINE_LIMIT,
    DKIMResult,
    ParsedMessage,
    malformed_result,
    verify_dkim_parsed,
)
from mailfort.auth.dmarc import (
    Disposition,
    DMARCResult,
    PolicyLookup,
    author_domains,
    discover_policy,
    evaluate,
    strictest,
)
from mailfort.auth.spf import SPFCheck, SPFResult, check_spf
from mailfort.dns import NotCached, Resolver, WouldWait, complete_now

HEADER_NAME: Final = "Authentication-Results"
_COMMENT_MAX: Final = 120
_FOLD_AT: Final = 70  # after the leading tab
# RFC 2045 token: what an authserv-id or a ptype value can be without quoting.
_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_DOMAIN = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)


# -- header text ----------------------------------------------------------------------------


def _comment(text: str) -> str:
    """A CFWS comment (RFC 5322 §3.2.2) that cannot break out of its parentheses."""
    text = " ".join(text.split())  # no CR/LF, no runs of whitespace
    if not (text.isascii() and text.isprintable()):  # the usual case needs no copy
        text = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)
    text = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    if len(text) > _COMMENT_MAX:
        text = text[: _COMMENT_MAX - 3].rstrip("\\") + "..."
    return f"({text})" if text else ""


def _value(text: str) -> str:
    """A ptype value (RFC 8601 §2.2 pvalue): a token, a domain or ``[local-part]@domain``
    as is, anything else as a quoted-string."""
    local, at, domain = text.rpartition("@")
    if _TOKEN.match(text) or _DOMAIN.match(text):
        return text
    if at and _DOMAIN.match(domain) and (not local or _DOT_ATOM.match(local)):
        return text
    cleaned = text
    if not (text.isascii() and text.isprintable()):
        cleaned = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _resinfo(method: str, result: str, comment: str, props: Sequence[tuple[str, str]]) -> str:
    return _resinfo_text(method, result, comment, tuple(props))


# Memoised: mail from one sender gets the same results, comments and properties message
# after message, and quoting and folding them cost ~15 µs each (five per message).
@lru_cache(maxsize=4096)
def _resinfo_text(
    method: str, result: str, comment: str, props: tuple[tuple[str, str], ...]
) -> str:
    parts = [f"{method}={result}"]
    if comment:
        parts.append(_comment(comment))
    parts.extend(f"{k}={_value(v)}" for k, v in props if v)
    # Fold between elements to keep lines near 78 characters (RFC 5322 §2.1.1); an element
    # (a comment included) is never split, so a line stays well under the 998 limit.
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 1 + len(part) > _FOLD_AT:
            lines.append(part)
        else:
            lines[-1] += " " + part
    return "\r\n\t  ".join(lines)


def _spf_resinfo(check: SPFCheck, ip: str) -> str:
    if check.result in ("pass", "fail", "softfail", "neutral"):
        verb = {"pass": "designates", "fail": "does not designate"}.get(
            check.result, "does not clearly designate"
        )
        comment = f"{check.domain or 'domain'} {verb} {ip} as permitted sender"
    else:
        comment = check.explanation
    # RFC 8601 §2.7.2: smtp.mailfrom / smtp.helo. The domain is enough for DMARC and
    # filters; the local part is not copied into every stored message.
    ptype = "smtp.mailfrom" if check.identity == "mailfrom" else "smtp.helo"
    return _resinfo("spf", check.result, comment, [(ptype, check.domain)])


def build_header(
    authserv_id: str,
    *,
    ip: str | None = None,
    spf: SPFResult | None = None,
    dkim: DKIMResult | None = None,
    dmarc: DMARCResult | None = None,
    arc: ARCResult | None = None,
) -> bytes:
    """``Authentication-Results: <authserv-id>; method=result ...`` folded one result per
    line, CRLF-terminated (RFC 8601 §2.2)."""
    if not _TOKEN.match(authserv_id):
        raise ValueError(f"authserv-id must be a token (a host name), got {authserv_id!r}")
    infos: list[str] = []
    if spf is not None:
        infos.append(_spf_resinfo(spf.mailfrom, ip or "the client"))
        if spf.helo is not None:
            infos.append(_spf_resinfo(spf.helo, ip or "the client"))
    if dkim is not None:
        if not dkim.signatures:
            infos.append(_resinfo("dkim", "none", "", []))
        for sig in dkim.signatures:
            comment = sig.reason or (f"{sig.key_bits}-bit key" if sig.key_bits else "")
            if sig.testing:
                comment = (comment + "; " if comment else "") + "key in test mode"
            infos.append(
                _resinfo(
                    "dkim",
                    sig.result,
                    comment,
                    [
                        ("header.d", sig.domain),
                        ("header.i", sig.identity),
                        ("header.s", sig.selector),
                        ("header.a", sig.algorithm),
                        ("header.b", sig.header_b),
                    ],
                )
            )
    if dmarc is not None:
        bits = []
        if dmarc.policy is not None:
            bits.append(f"p={dmarc.policy.upper()}")
            if dmarc.pct != 100:
                bits.append(f"pct={dmarc.pct}")
        if dmarc.result == "fail":
            bits.append(f"dis={dmarc.disposition.upper()}")
        if dmarc.reason and dmarc.result != "fail":
            bits.append(dmarc.reason)
        infos.append(
            _resinfo("dmarc", dmarc.result, " ".join(bits), [("header.from", dmarc.from_domain)])
        )
    if arc is not None:
        comment = ""
        if arc.sets:
            comment = "sealers " + ",".join(arc.sealers)
        if arc.reason and arc.cv == "fail":
            comment = (comment + "; " if comment else "") + arc.reason
        props = [("smtp.remote-ip", ip or "")]
        if arc.oldest_pass is not None:
            props.insert(0, ("header.oldest-pass", str(arc.oldest_pass)))
        infos.append(_resinfo("arc", arc.cv, comment, props))
    if not infos:
        return f"{HEADER_NAME}: {authserv_id}; none\r\n".encode("ascii")
    return (f"{HEADER_NAME}: {authserv_id};\r\n\t" + ";\r\n\t".join(infos) + "\r\n").encode("ascii")


# -- removing forged headers ----------------------------------------------------------------


def _skip_cfws(text: str, i: int) -> int:
    """Index after whitespace and (nested) comments starting at ``i``."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif not c.isspace():
            break
        i += 1
    return i


def claimed_authserv_id(value: bytes) -> str | None:
    """The authserv-id at the start of an Authentication-Results value (RFC 8601 §2.2),
    lower-cased; None when there is none."""
    text = value.decode("utf-8", "replace")
    i = _skip_cfws(text, 0)
    if i < len(text) and text[i] == '"':
        out = []
        i += 1
        while i < len(text) and text[i] != '"':
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
            out.append(text[i])
            i += 1
        return "".join(out).strip().lower() or None
    m = re.match(r"[^\s;()]+", text[i:])
    return m.group(0).lower() if m else None


def _split_fields(head: bytes) -> list[bytes]:
    """Header fields with their continuation lines, bytes unchanged (LF or CRLF)."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _split_message(raw: bytes) -> tuple[bytes, bytes]:
    """(header section, rest from the blank line on)."""
    if raw.startswith((b"\r\n", b"\n")):
        return b"", raw
    lf = first_blank_lf(raw)
    if lf < 0:
        return raw, b""
    cut = lf + 1  # keep the last header's EOL
    return raw[:cut], raw[cut:]


def remove_forged_results(raw: bytes, authserv_id: str) -> tuple[bytes, int]:
    """Drop every Authentication-Results field that names ``authserv_id`` (RFC 8601 §5).

    Fields naming anyone else, and ARC-Authentication-Results (part of ARC sets, which
    must stay intact), are kept byte for byte. Leading continuation lines are dropped too.
    Returns (message, number of fields or orphan lines removed).
    """
    ours = authserv_id.lower()
    head, rest = _split_message(raw)
    if head[:1] not in (b" ", b"\t") and b"authentication-results" not in head.lower():
        # No orphan continuation (only the first lines can be one) and no field that could
        # be an Authentication-Results: the loop below would keep every byte.
        return raw, 0
    kept: list[bytes] = []
    removed = 0
    for f in _split_fields(head):
        if f[:1] in (b" ", b"\t"):
            # Continuation lines before the first field belong to no field. Left in place
            # they would continue *our* header once it is prepended, letting the sender
            # append text to our Authentication-Results. Drop them.
            removed += 1
            continue
        name, colon, value = f.partition(b":")
        is_ar = colon and name.rstrip(b" \t").lower() == b"authentication-results"
        if is_ar and claimed_authserv_id(value) == ours:
            removed += 1
            continue
        kept.append(f)
    return b"".join(kept) + rest, removed


# -- the entry point ------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthVerdict:
    spf: SPFResult
    dkim: DKIMResult
    dmarc: DMARCResult
    arc: ARCResult
    header: bytes  # our Authentication-Results field, CRLF-terminated
    message: bytes  # the message without forged Authentication-Results fields
    removed: int  # how many such fields were removed

    @property
    def disposition(self) -> Disposition:
        """DMARC's requested handling: none / quarantine / reject."""
        return self.dmarc.disposition

    @property
    def temperror(self) -> bool:
        """A DNS failure left the decision open; the MX should answer 451 and let the
        sender retry. True when DMARC itself is temperror, or when no DMARC policy applies
        and SPF for MAIL FROM is temperror (RFC 7208 §8.6)."""
        if self.dmarc.result == "temperror":
            return True
        return self.dmarc.result == "none" and self.spf.result == "temperror"

    def stamped(self) -> bytes:
        """The message to store or forward: our header first, then the cleaned message."""
        return self.header + self.message


async def _parse(raw: bytes) -> ParsedMessage | None:
    try:
        if len(raw) > INLINE_LIMIT:  # splitting a large message is real work: off the loop
            return await asyncio.to_thread(ParsedMessage.parse, raw)
        return ParsedMessage.parse(raw)
    except dkimpy.MessageFormatError:
        return None


async def authenticate(
    raw: bytes,
    ip: str,
    helo: str,
    mail_from: str,
    resolver: Resolver,
    authserv_id: str,
    *,
    sample: Callable[[], float] = random.random,
) -> AuthVerdict:
    """Run SPF, DKIM, ARC and DMARC on one received message, concurrently where they do
    not depend on each other: SPF (worker threads), DKIM and ARC key lookups and the DMARC
    policy lookup all start at once; DMARC is evaluated when SPF and DKIM are in.

    Mail comes from the same senders again and again, so every record is usually in the
    resolver's cache. The checks are then first tried against the cache alone, to the end
    at once, without a task or a thread hand-off each (~0.1 ms of a ~0.5 ms check); a
    record missing from the cache abandons that attempt, before anything was asked of the
    network, for the concurrent path.
    """
    if resolver.caching and len(raw) <= INLINE_LIMIT:
        attempt = _authenticate(raw, ip, helo, mail_from, resolver.cache_only_view(), authserv_id)
        try:
            verdict = complete_now(attempt)
        except (NotCached, WouldWait):
            pass
        else:
            return verdict.decided(sample)
    verdict = await _authenticate(raw, ip, helo, mail_from, resolver, authserv_id)
    return verdict.decided(sample)


@dataclass(frozen=True)
class _Checked:
    """What the lookups found, before DMARC turns it into a verdict."""

    raw: bytes
    ip: str
    authserv_id: str
    msg: ParsedMessage | None
    spf: SPFResult
    dkim: DKIMResult
    arc: ARCResult
    domains: list[str]
    lookups: Sequence[PolicyLookup]

    def decided(self, sample: Callable[[], float]) -> AuthVerdict:
        if self.msg is None:
            dmarc_res = DMARCResult("permerror", "none", "", reason="malformed header section")
        elif not self.domains:
            dmarc_res = DMARCResult("permerror", "none", "", reason="no RFC5322.From domain")
        else:
            # RFC 7489 §6.6.1: several author domains -> the strictest outcome.
            dmarc_res = strictest(
                [evaluate(lk, self.spf, self.dkim, sample=sample) for lk in self.lookups]
            )
        header = build_header(
            self.authserv_id,
            ip=self.ip,
            spf=self.spf,
            dkim=self.dkim,
            dmarc=dmarc_res,
            arc=self.arc,
        )
        cleaned, removed = remove_forged_results(self.raw, self.authserv_id)
        return AuthVerdict(self.spf, self.dkim, dmarc_res, self.arc, header, cleaned, removed)


async def _authenticate(
    raw: bytes, ip: str, helo: str, mail_from: str, resolver: Resolver, authserv_id: str
) -> _Checked:
    """The lookups and signature checks; SPF starts first, as it may need threads."""
    spf_check = check_spf(resolver, ip, mail_from, helo, receiver=authserv_id)
    if resolver.cache_only:
        spf_task: asyncio.Future[SPFResult] | None = None
        spf_res = await spf_check  # cannot wait: settles the attempt's cheapest part first
    else:
        spf_task = asyncio.ensure_future(spf_check)
    try:
        msg = await _parse(raw)
        lookups: Sequence[PolicyLookup] = ()
        domains: list[str] = []
        if msg is None:
            # dkimpy cannot split the header section: nothing signed can be verified.
            dkim_res = malformed_result(raw)
            arc_res = ARCResult(
                "fail" if b"arc-seal" in raw.lower() else "none", (), "malformed header section"
            )
        else:
            domains = list(dict.fromkeys(author_domains(msg.headers) or []))
            dkim_res, arc_res, lookups = await resolver.gather(
                verify_dkim_parsed(resolver, msg),
                verify_arc_parsed(resolver, msg),
                resolver.gather(*(discover_policy(resolver, d) for d in domains)),
            )
        if spf_task is not None:
            spf_res = await spf_task
    finally:
        if spf_task is not None:
            spf_task.cancel()  # no-op once done; stops an orphan if the checks above raised
    return _Checked(raw, ip, authserv_id, msg, spf_res, dkim_res, arc_res, domains, lookups)


__all__ = [
    "HEADER_NAME",
    "AuthVerdict",
    "authenticate",
    "build_header",
    "claimed_authserv_id",
    "remove_forged_results",
]
