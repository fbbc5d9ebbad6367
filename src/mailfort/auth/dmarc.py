"""DMARC (RFC 7489): policy discovery, identifier alignment and the disposition.

The Organizational Domain comes from the Public Suffix List through `publicsuffixlist`
(it passes the PSL's own test vectors; `publicsuffix2` does not). Evaluation is ours rather
than authheaders': that one checks only the first DKIM signature and cannot tell a DNS
outage from a missing record, both of which change the answer here.
"""

from __future__ import annotations

import email.policy
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from typing import Final, Literal

from publicsuffixlist import PublicSuffixList

from mailfort.auth.dkim import DKIMResult
from mailfort.auth.spf import SPFCheck, SPFResult
from mailfort.dns import Resolver, TemporaryDNSError

DMARCResultCode = Literal["pass", "fail", "none", "temperror", "permerror"]
Disposition = Literal["none", "quarantine", "reject"]
Alignment = Literal["r", "s"]

_SEVERITY: Final[dict[str, int]] = {"none": 0, "quarantine": 1, "reject": 2}
_POLICIES: Final = ("none", "quarantine", "reject")
_VERSION = re.compile(r"^v\s*=\s*DMARC1\s*(;|$)")  # §6.4: "v=DMARC1" first, case-sensitive
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")


@cache
def _psl() -> PublicSuffixList:
    # Parsing the bundled list takes ~35 ms; do it once, on first use.
    return PublicSuffixList()


def normalise_domain(domain: str) -> str:
    """Lower-case A-label form without the trailing dot, for comparing identifiers."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


@lru_cache(maxsize=8192)
def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label; a public suffix stands for itself.

    Memoised: the list is fixed for the life of the process, and each message asks for the
    same few domains two or three times (~20 µs a walk of the list)."""
    domain = normalise_domain(domain)
    return _psl().privatesuffix(domain) or domain


def aligned(identifier: str, author: str, mode: Alignment) -> bool:
    """RFC 7489 §3.1.1/§3.1.2: strict = same domain, relaxed = same Organizational Domain."""
    identifier, author = normalise_domain(identifier), normalise_domain(author)
    if not identifier or not author:
        return False
    if mode == "s":
        return identifier == author
    return organizational_domain(identifier) == organizational_domain(author)


@dataclass(frozen=True)
class DMARCRecord:
    """A policy record (RFC 7489 §6.3); defaults filled in."""

    policy: Disposition
    subdomain_policy: Disposition | None
    adkim: Alignment
    aspf: Alignment
    pct: int
    rua: tuple[str, ...]


@lru_cache(maxsize=4096)
def parse_record(text: str) -> DMARCRecord | None:
    """The record, or None when it is not a usable DMARC record (§6.6.3 step 6).

    Memoised by text (the result is immutable): each message from a domain reads the same
    record again."""
    if not _VERSION.match(text):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    rua = tuple(u.strip() for u in tags.get("rua", "").split(",") if _URI.match(u.strip()))
    p = _disposition(tags.get("p", ""))
    sp = _disposition(tags["sp"]) if "sp" in tags else None
    if p is None or ("sp" in tags and sp is None):
        # §6.6.3 step 6: an invalid p=/sp= still counts as p=none when the owner asked
        # for aggregate reports; otherwise DMARC does not apply.
        if not rua:
            return None
        p, sp = "none", None
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    if not 0 <= pct <= 100:
        pct = 100
    return DMARCRecord(
        policy=p,
        subdomain_policy=sp,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct=pct,
        rua=rua,
    )


def _disposition(value: str) -> Disposition | None:
    # RFC 5234 quoted strings are case-insensitive, so "Reject" is "reject".
    value = value.strip().lower()
    if value == "none":
        return "none"
    if value == "quarantine":
        return "quarantine"
    if value == "reject":
        return "reject"
    return None


@dataclass(frozen=True)
class PolicyLookup:
    """The outcome of policy discovery for one author domain (§6.6.3)."""

    from_domain: str
    org_domain: str
    record: DMARCRecord | None
    record_domain: str | None  # where the record was found
    temperror: bool = False
    reason: str = ""


async def _records_at(resolver: Resolver, domain: str) -> list[str]:
    return [t for t in await resolver.txt(f"_dmarc.{domain}") if _VERSION.match(t)]


async def discover_policy(resolver: Resolver, from_domain: str) -> PolicyLookup:
    """RFC 7489 §6.6.3 steps 1-6."""
    from_domain = normalise_domain(from_domain)
    org = organizational_domain(from_domain)
    try:
        found = await _records_at(resolver, from_domain)  # steps 1-2
        where = from_domain
        if not found and org != from_domain:  # step 3-4
            found = await _records_at(resolver, org)
            where = org
    except TemporaryDNSError:
        return PolicyLookup(from_domain, org, None, None, True, "policy lookup failed")
    if len(found) != 1:  # step 5
        why = "no policy record" if not found else "more than one policy record"
        return PolicyLookup(from_domain, org, None, None, False, why)
    record = parse_record(found[0])  # step 6
    if record is None:
        return PolicyLookup(from_domain, org, None, where, False, "unusable policy record")
    return PolicyLookup(from_domain, org, record, where, False)


@dataclass(frozen=True)
class DMARCResult:
    result: DMARCResultCode
    disposition: Disposition  # what to do with the message (after pct sampling)
    from_domain: str  # RFC5322.From domain evaluated ("" when there was none)
    policy_domain: str | None = None  # where the record was found
    policy: Disposition | None = None  # p= or sp= that applied, before pct
    pct: int = 100
    sampled_out: bool = False  # pct excluded this message: disposition one step milder
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""


def evaluate(
    lookup: PolicyLookup,
    spf: SPFResult | SPFCheck | None,
    dkim: DKIMResult,
    *,
    sample: Callable[[], float] = random.random,
) -> DMARCResult:
    """Apply a discovered policy to the SPF and DKIM outcomes (RFC 7489 §6.6.2, §6.6.4)."""
    author = lookup.from_domain
    if lookup.temperror:
        return DMARCResult("temperror", "none", author, reason=lookup.reason)
    record = lookup.record
    if record is None:
        return DMARCResult("none", "none", author, lookup.record_domain, reason=lookup.reason)

    # §6.3 sp=: the policy for subdomains, when the record came from the Organizational
    # Domain on behalf of a subdomain author.
    policy = record.policy
    if lookup.record_domain != author and record.subdomain_policy is not None:
        policy = record.subdomain_policy

    spf_check = spf.mailfrom if isinstance(spf, SPFResult) else spf
    # §3.1.2/§4.2: the SPF-authenticated identifier is the MAIL FROM domain (postmaster@
    # HELO for the null sender, which is what SPFResult.mailfrom evaluated).
    spf_aligned = (
        spf_check is not None
        and spf_check.result == "pass"
        and aligned(spf_check.domain, author, record.aspf)
    )
    # §3.1.1: any passing signature whose d= aligns.
    dkim_aligned = any(
        s.result == "pass" and aligned(s.domain, author, record.adkim) for s in dkim.signatures
    )
    outcome = DMARCResult(
        "fail",
        "none",
        author,
        policy_domain=lookup.record_domain,
        policy=policy,
        pct=record.pct,
        spf_aligned=spf_aligned,
        dkim_aligned=dkim_aligned,
    )
    if spf_aligned or dkim_aligned:
        return replace(outcome, result="pass")

    # No aligned pass. If an identifier that would align could not be checked because
    # of DNS trouble, a retry may pass: report temperror so the MX can defer (451).
    spf_temp = (
        spf_check is not None
        and spf_check.result == "temperror"
        and aligned(spf_check.domain, author, record.aspf)
    )
    dkim_temp = any(
        s.result == "temperror" and aligned(s.domain, author, record.adkim) for s in dkim.signatures
    )
    if spf_temp or dkim_temp:
        return replace(outcome, result="temperror", reason="aligned identifier had a DNS error")

    # §6.6.4 / §6.3 pct=: the policy applies to pct% of failing mail; the rest gets the
    # next milder policy (reject -> quarantine, quarantine -> none).
    disposition: Disposition = policy
    sampled_out = False
    if record.pct < 100 and policy != "none" and sample() * 100 >= record.pct:
        disposition = "quarantine" if policy == "reject" else "none"
        sampled_out = True
    return replace(
        outcome,
        disposition=disposition,
        sampled_out=sampled_out,
        reason="no aligned SPF or DKIM pass",
    )


def author_domains(headers: Iterable[tuple[bytes, bytes]]) -> list[str] | None:
    """Domains of the RFC5322.From addresses (§6.6.1), unique, in order.

    None when the From field is missing or holds no usable address. A value that is one
    plain mailbox (`_PLAIN_FROM`) is read directly; anything else (groups, comments,
    quoted strings, encoded words, several addresses, non-ASCII) goes through
    email.headerregistry, as every value did before. The parser cost ~0.2 ms per message;
    ``tests/test_auth_dmarc_from.py`` checks that both paths give the same domains.
    """
    domains: list[str] = []
    for name, value in headers:
        if name.strip().lower() != b"from":
            continue
        text = value.decode("utf-8", "replace").replace("\r\n", "").replace("\n", "").strip()
        for found in _from_domains(text):
            domain = normalise_domain(found)
            if domain and domain not in domains:
                domains.append(domain)
    return domains or None


# RFC 5322 atext without "=" and "?" (no encoded word can start) for the display name;
# "." too (obs-phrase, "John Q. Public"), which the parser takes with a defect noted.
_NAME_CHARS = r"A-Za-z0-9!#$%&'*+/^_`{|}~.-"
_ATEXT = r"A-Za-z0-9!#$%&'*+/^_`{|}~-"  # also without "=" and "?" in local parts
_LOCAL = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_FROM = re.compile(
    # A name starting with "." makes the parser find no address at all: not this path.
    rf"(?:[{_ATEXT}][{_NAME_CHARS}]*(?:[ \t]+[{_NAME_CHARS}]+)*[ \t]*)?<{_LOCAL}@({_DOMAIN})>"
    rf"|{_LOCAL}@({_DOMAIN})"
)


def _from_domains(text: str) -> list[str]:
    """The address domains in one unfolded From value, in order (may repeat)."""
    if text.isascii():
        m = _PLAIN_FROM.fullmatch(text)
        if m is not None:
            return [m.group(1) or m.group(2)]
    return _parsed_from_domains(text)


def _parsed_from_domains(text: str) -> list[str]:
    """email.headerregistry's reading of a From value: the reference for the fast path."""
    try:
        header = email.policy.default.header_factory("From", text)
        addresses = list(getattr(header, "addresses", ()))
    except Exception:  # the stdlib parser raises a variety of errors on junk
        addresses = []
    return [addr.domain or "" for addr in addresses]


def strictest(results: Sequence[DMARCResult]) -> DMARCResult:
    """§6.6.1: several author domains -> the strictest outcome among them."""
    fails = [r for r in results if r.result == "fail"]
    if fails:
        return max(fails, key=lambda r: _SEVERITY[r.disposition])
    for code in ("temperror", "permerror", "none"):
        for r in results:
            if r.result == code:
                return r
    return results[0]


async def check_dmarc(
    resolver: Resolver,
    from_domains: str | Sequence[str] | None,
    spf: SPFResult | SPFCheck | None,
    dkim: DKIMResult,
    *,
    sample: Callable[[], float] = random.random,
) -> DMARCResult:
    """Discover and apply the policy of each author domain."""
    if isinstance(from_domains, str):
        from_domains = [from_domains]
    if not from_domains:
        return DMARCResult("permerror", "none", "", reason="no RFC5322.From domain")
    results = []
    for domain in dict.fromkeys(normalise_domain(d) for d in from_domains):
        lookup = await discover_policy(resolver, domain)
        results.append(evaluate(lookup, spf, dkim, sample=sample))
    return strictest(results)


__all__ = [
    "DMARCRecord",
    "DMARCResult",
    "DMARCResultCode",
    "Disposition",
    "PolicyLookup",
    "aligned",
    "author_domains",
    "check_dmarc",
    "discover_policy",
    "evaluate",
    "normalise_domain",
    "organizational_domain",
    "parse_record",
    "strictest",
]
