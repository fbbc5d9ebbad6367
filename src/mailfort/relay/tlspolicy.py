"""Which TLS each MX of a recipient domain gets, and whether a session met it.

The delivery client uses it like this (one plan per domain and delivery attempt, or one per
``plan_ttl`` seconds)::

    plan = await tls.plan(domain, mx_hosts)          # MX hosts in preference order
    for mx in plan.candidates:                       # MXs the policy rules out are gone
        smtp = connect(mx.host); ehlo
        if "STARTTLS" not offered:
            outcome = tls.judge_no_starttls(mx)
        else:
            try: starttls(tls.ssl_context(mx), server_hostname=mx.host)
            except (ssl.SSLError, OSError) as exc:
                outcome = tls.judge_handshake_error(mx, exc)
                # testing mode: outcome.retry_unverified -> reconnect, STARTTLS with
                # tls.ssl_context(mx, unverified=True), judge_session again, deliver
            else:
                outcome = tls.judge_session(mx, ssl_object)   # DANE is checked here
        await tls.record(mx, outcome, sending_ip=..., receiving_ip=..., receiving_helo=...)
        if not outcome.deliver: QUIT, try the next MX (all refused: temporary failure)
        elif no TLS and not outcome.plaintext_ok: QUIT, next MX

Nothing may be sent after STARTTLS (not even EHLO) before `judge_session` says so:
DANE authenticates only after the handshake (see `contexts`).

The modes per MX (RFC 8461 §2 and RFC 7672 §1.3 on how the two combine):
- ``dane``: the MX has authenticated TLSA records. TLS is required and the chain must
  match them; an MTA-STS policy does not override a DANE failure (RFC 8461 §2).
- ``mta-sts-enforce``: STARTTLS with a PKIX-valid certificate for the MX name, and the
  MX must match the policy (else it is skipped before any connection).
- ``mta-sts-testing``: as enforce, but failures are reported and delivery goes on.
- ``opportunistic``: STARTTLS when offered, any certificate (RFC 7435).

An enforce policy's MX list applies to DANE hosts too: the MX RRset may be unsigned,
and the policy is then the only authenticated statement of which hosts are the
domain's.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from mailfort.dns import Resolver

from ._names import normalize_host
from .contexts import dane_context, opportunistic_context, pkix_context
from .dane import DaneStatus, TLSALookup, TLSARecord, lookup_tlsa, peer_chain_der, verify_chain
from .mtasts import MTASTS, Mode, Policy, PolicyLookup, mx_allowed
from .tlsrpt import FailureDetail, PolicyType, ReportPolicy, ResultType, TLSReporter

__all__ = [
    "DeliveryPlan",
    "MXPlan",
    "TLSMode",
    "TLSOutcome",
    "TLSPolicy",
    "classify_tls_error",
    "dane_context",
    "opportunistic_context",
    "pkix_context",
]


# Plans kept at most (expired ones are dropped when it is reached).
_PLAN_CACHE_MAX = 10_000


class TLSMode(StrEnum):
    DANE = "dane"
    MTA_STS_ENFORCE = "mta-sts-enforce"
    MTA_STS_TESTING = "mta-sts-testing"
    OPPORTUNISTIC = "opportunistic"


@dataclass(frozen=True)
class MXPlan:
    host: str
    mode: TLSMode
    report_policy: ReportPolicy  # where TLS-RPT counts this MX's sessions
    tlsa: tuple[TLSARecord, ...] = ()  # DANE: usable records; () = TLS without authentication
    sts_policy: Policy | None = None
    mx_in_policy: bool = True  # testing mode may go to an MX outside the policy
    skip: ResultType | None = None  # set: do not connect to this MX, and why
    skip_detail: str = ""

    @property
    def usable(self) -> bool:
        return self.skip is None

    @property
    def require_tls(self) -> bool:
        """No plaintext fallback (DANE: RFC 7672 §2.2; enforce: RFC 8461 §5)."""
        return self.mode in (TLSMode.DANE, TLSMode.MTA_STS_ENFORCE)


@dataclass(frozen=True)
class DeliveryPlan:
    domain: str
    mxs: tuple[MXPlan, ...]
    sts: PolicyLookup | None = None

    @property
    def candidates(self) -> list[MXPlan]:
        """The MXs delivery may try, in the order given. Empty: defer the message."""
        return [mx for mx in self.mxs if mx.usable]


@dataclass(frozen=True)
class TLSOutcome:
    """The verdict on one session (or attempt) against its MX's plan."""

    deliver: bool  # go on and send mail on this session
    failure: ResultType | None = None  # what TLS-RPT records; None is a success
    detail: str = ""
    plaintext_ok: bool = False  # mail may go without TLS (no STARTTLS, failed handshake)
    retry_unverified: bool = False  # testing mode: reconnect with the unverified context
    report: bool = True  # False: already counted (the testing-mode retry)

    @property
    def ok(self) -> bool:
        return self.failure is None


# OpenSSL X509_V_ERR_* codes, as `ssl.SSLCertVerificationError.verify_code` gives them.
_EXPIRED = {9, 10}  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
_HOST_MISMATCH = {62, 64}  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
_NOT_TRUSTED = {2, 18, 19, 20, 21, 24, 27, 28}  # no path to a trusted root, untrusted CA


def _verification_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind ``exc``, if that is what it is. SMTP
    client libraries may wrap the `ssl` error in their own exception."""
    seen: BaseException | None = exc
    for _ in range(8):  # a cause chain, bounded against cycles
        if seen is None or isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def classify_tls_error(exc: BaseException) -> tuple[ResultType, str]:
    """RFC 8460 §4.3.1 result type (and a reason) for a failed TLS handshake."""
    verr = _verification_error(exc)
    if verr is None:
        return ResultType.VALIDATION_FAILURE, f"{type(exc).__name__}: {exc}"
    code = verr.verify_code
    message = verr.verify_message or str(verr)
    if code in _EXPIRED:
        return ResultType.CERTIFICATE_EXPIRED, message
    if code in _HOST_MISMATCH:
        return ResultType.CERTIFICATE_HOST_MISMATCH, message
    if code in _NOT_TRUSTED:
        return ResultType.CERTIFICATE_NOT_TRUSTED, message
    return ResultType.VALIDATION_FAILURE, message


@dataclass
class TLSPolicy:
    """Plans and judges outbound TLS. One per process; contexts are built once.

    ``dane_required``: recipient domains whose MXs must all have authenticated TLSA
    records (local policy; a failure is reported as ``dane-required``, RFC 8460 §4.3.2.1).

    ``plan_ttl``: seconds a plan is reused for the same domain and MX list (0: planned
    afresh for every attempt). Planning reads the MTA-STS cache and asks DNS for TLSA
    records of every MX; a queue delivering hundreds of messages a second to one domain
    need not repeat that for each. A plan changes no faster than its inputs: a policy is
    cached for its max_age anyway (RFC 8461 §3.3), and a TLSA change is seen within
    ``plan_ttl`` seconds, as a resolver cache delays it by up to the record's TTL.
    Concurrent attempts for an uncached domain share one planning.
    """

    resolver: Resolver
    mtasts: MTASTS | None = None
    reporter: TLSReporter | None = None
    dane: bool = True
    ca_file: str | Path | None = None
    dane_required: Collection[str] = ()
    plan_ttl: float = 0.0
    _contexts: dict[str, ssl.SSLContext] = field(default_factory=dict, init=False, repr=False)
    _plans: dict[tuple[str, tuple[str, ...]], tuple[float, asyncio.Task[DeliveryPlan]]] = field(
        default_factory=dict, init=False, repr=False
    )

    # -- planning ----------------------------------------------------------------------

    async def plan(self, domain: str, mx_hosts: Sequence[str]) -> DeliveryPlan:
        """Decide per MX. ``mx_hosts`` in preference order, or ``[domain]`` for an implicit
        MX; a null MX (RFC 7505) is the caller's to handle first (its "." is dropped here).
        No candidates left means defer, never bounce (RFC 8461 §5.1)."""
        domain = normalize_host(domain)
        hosts = [h for h in (normalize_host(h) for h in mx_hosts) if h]
        if self.plan_ttl <= 0:
            return await self._plan(domain, hosts)
        key = (domain, tuple(hosts))
        now = time.monotonic()
        cached = self._plans.get(key)
        if cached is None or cached[0] <= now:
            if len(self._plans) >= _PLAN_CACHE_MAX:
                self._plans = {k: v for k, v in self._plans.items() if v[0] > now}
            task = asyncio.get_running_loop().create_task(self._plan(domain, hosts))
            cached = self._plans[key] = (now + self.plan_ttl, task)
        task = cached[1]
        try:
            # shield: one waiter cancelled must not cancel the planning the others share.
            return await asyncio.shield(task)
        except Exception:
            if self._plans.get(key) is cached:
                del self._plans[key]  # a failed planning is not kept
            raise

    async def _plan(self, domain: str, hosts: list[str]) -> DeliveryPlan:
        sts = await self.mtasts.policy_for(domain) if self.mtasts is not None else None
        if sts is not None and sts.error is not None and self.reporter is not None:
            # A fetch that failed is counted once per plan, under the policy that stood
            # in for it (a cached one) or under "no-policy-found" (RFC 8460 §4.3.2.2).
            where = (
                sts.policy.report_policy(domain)
                if sts.policy is not None
                else ReportPolicy(PolicyType.NO_POLICY, domain)
            )
            await self.reporter.failure(
                where,
                FailureDetail(
                    sts.error,
                    receiving_mx_hostname=f"mta-sts.{domain}",
                    failure_reason_code=sts.detail[:200] or None,
                ),
            )
        if self.dane:
            lookups = await asyncio.gather(*(lookup_tlsa(self.resolver, h) for h in hosts))
        else:
            lookups = [TLSALookup(h, DaneStatus.NONE) for h in hosts]
        plans = [self._plan_mx(domain, h, sts, t) for h, t in zip(hosts, lookups, strict=True)]
        for mx in plans:
            if mx.skip is not None and self.reporter is not None:
                await self.reporter.failure(
                    mx.report_policy,
                    FailureDetail(
                        mx.skip, receiving_mx_hostname=mx.host, failure_reason_code=mx.skip_detail
                    ),
                )
        return DeliveryPlan(domain, tuple(plans), sts)

    def _plan_mx(
        self, domain: str, host: str, sts: PolicyLookup | None, tlsa: TLSALookup
    ) -> MXPlan:
        policy = sts.policy if sts is not None and sts.applies else None
        in_policy = policy is None or mx_allowed(policy, host)
        if policy is not None and policy.mode is Mode.ENFORCE and not in_policy:
            return MXPlan(
                host,
                TLSMode.MTA_STS_ENFORCE,
                policy.report_policy(domain),
                sts_policy=policy,
                mx_in_policy=False,
                skip=ResultType.VALIDATION_FAILURE,
                skip_detail="mx-not-in-sts-policy",
            )
        if tlsa.status is DaneStatus.FAILED:
            # RFC 7672 §2.1.1: a signed zone whose TLSA answer cannot be had (bogus, or
            # SERVFAIL) must not fall back to weaker TLS: this MX is not used.
            return MXPlan(
                host,
                TLSMode.DANE,
                tlsa.report_policy(),
                skip=ResultType.DNSSEC_INVALID,
                skip_detail=tlsa.detail[:200],
            )
        if tlsa.applies:
            return MXPlan(
                host,
                TLSMode.DANE,
                tlsa.report_policy(),
                tlsa=tlsa.usable_records,
                sts_policy=policy,
                mx_in_policy=in_policy,
            )
        if domain in {normalize_host(d) for d in self.dane_required}:
            return MXPlan(
                host,
                TLSMode.DANE,
                tlsa.report_policy(),
                skip=ResultType.DANE_REQUIRED,
                skip_detail=tlsa.detail[:200] or "no authenticated TLSA records",
            )
        if policy is not None:
            mode = (
                TLSMode.MTA_STS_ENFORCE if policy.mode is Mode.ENFORCE else TLSMode.MTA_STS_TESTING
            )
            return MXPlan(
                host, mode, policy.report_policy(domain), sts_policy=policy, mx_in_policy=in_policy
            )
        return MXPlan(host, TLSMode.OPPORTUNISTIC, ReportPolicy(PolicyType.NO_POLICY, domain))

    # -- contexts ----------------------------------------------------------------------

    def ssl_context(self, mx: MXPlan, *, unverified: bool = False) -> ssl.SSLContext:
        """The client context for STARTTLS to ``mx`` (TLS 1.2 or later in every mode).
        Pass ``server_hostname=mx.host`` with it: SNI, and the name PKIX checks."""
        if unverified or mx.mode is TLSMode.OPPORTUNISTIC:
            kind = "opportunistic"
        elif mx.mode is TLSMode.DANE:
            kind = "dane"
        else:
            kind = "pkix"
        ctx = self._contexts.get(kind)
        if ctx is None:
            if kind == "pkix":
                ctx = pkix_context(self.ca_file)
            elif kind == "dane":
                ctx = dane_context()
            else:
                ctx = opportunistic_context()
            self._contexts[kind] = ctx
        return ctx

    # -- judging -----------------------------------------------------------------------

    def judge_no_starttls(self, mx: MXPlan) -> TLSOutcome:
        """The MX did not offer STARTTLS."""
        failure = ResultType.STARTTLS_NOT_SUPPORTED
        if mx.require_tls:
            return TLSOutcome(False, failure, "STARTTLS not offered")
        return TLSOutcome(True, failure, "STARTTLS not offered", plaintext_ok=True)

    def judge_handshake_error(self, mx: MXPlan, exc: BaseException) -> TLSOutcome:
        """STARTTLS failed (the connection is unusable afterwards)."""
        failure, detail = classify_tls_error(exc)
        if mx.require_tls:
            return TLSOutcome(False, failure, detail)
        if mx.mode is TLSMode.MTA_STS_TESTING and _verification_error(exc) is not None:
            # RFC 8461 §5: testing mode reports the failure and delivers as if there were
            # no policy: a new connection without certificate verification.
            return TLSOutcome(True, failure, detail, plaintext_ok=True, retry_unverified=True)
        # Opportunistic TLS that fails falls back to plaintext (RFC 7435 §1.3; RFC 3207 §4.1
        # leaves the failed connection unusable, so on a new one).
        return TLSOutcome(True, failure, detail, plaintext_ok=True)

    def judge_session(self, mx: MXPlan, tls: ssl.SSLObject | ssl.SSLSocket) -> TLSOutcome:
        """The handshake finished; may mail go over this session?"""
        if mx.mode is TLSMode.DANE:
            if not mx.tlsa:
                # RFC 7672 §2.2: authenticated TLSA records, none usable: TLS is still
                # mandatory, but there is nothing to authenticate against.
                return TLSOutcome(True, detail="DANE: no usable TLSA records; encrypted only")
            result = verify_chain(mx.tlsa, peer_chain_der(tls), hostnames=(mx.host,))
            if not result.ok:
                return TLSOutcome(False, result.result_type, result.detail)
            return TLSOutcome(True, detail=result.detail)
        verified = tls.context.verify_mode == ssl.CERT_REQUIRED and tls.context.check_hostname
        if mx.mode is TLSMode.MTA_STS_ENFORCE:
            if not verified:
                # Guards a caller that passed the wrong context: enforce is never met
                # by an unverified session.
                return TLSOutcome(False, ResultType.VALIDATION_FAILURE, "session not verified")
            return TLSOutcome(True)
        if mx.mode is TLSMode.MTA_STS_TESTING:
            if not verified:
                # The retry after a verification failure, which was counted already.
                return TLSOutcome(True, report=False, detail="testing mode: unverified retry")
            if not mx.mx_in_policy:
                return TLSOutcome(True, ResultType.VALIDATION_FAILURE, "mx-not-in-sts-policy")
            return TLSOutcome(True)
        return TLSOutcome(True)

    async def record(
        self,
        mx: MXPlan,
        outcome: TLSOutcome,
        *,
        sending_ip: str | None = None,
        receiving_ip: str | None = None,
        receiving_helo: str | None = None,
    ) -> None:
        """Count the session for TLS-RPT (RFC 8460 §4.4: one session, one result)."""
        if self.reporter is None or not outcome.report:
            return
        if outcome.failure is None:
            await self.reporter.success(mx.report_policy)
            return
        await self.reporter.failure(
            mx.report_policy,
            FailureDetail(
                outcome.failure,
                sending_mta_ip=sending_ip,
                receiving_mx_hostname=mx.host,
                receiving_mx_helo=receiving_helo,
                receiving_ip=receiving_ip,
                failure_reason_code=outcome.detail[:200] or None,
            ),
        )
