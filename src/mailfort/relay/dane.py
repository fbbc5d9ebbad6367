"""DANE for SMTP (RFC 7672) on TLSA records (RFC 6698, RFC 7671, RFC 7218 names).

`lookup_tlsa` fetches ``_25._tcp.MX`` and classifies the answer (§2.1.1, §2.2):
DANE applies only when a validating resolver authenticated the TLSA RRset (the AD
bit). `verify_chain` matches the peer's certificate chain against the usable records:
DANE-EE(3) and DANE-TA(2) with selectors Cert(0)/SPKI(1) and matching types
Full(0)/SHA2-256(1)/SHA2-512(2). PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP
(§3.1.3), as are unknown parameters and malformed digests.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

import dns.rdtypes.ANY.TLSA
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from mailfort.dns import Resolver, TemporaryDNSError

from ._names import normalize_host, wildcard_match
from .tlsrpt import PolicyType, ReportPolicy, ResultType


class Usage(IntEnum):
    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


class Selector(IntEnum):
    CERT = 0
    SPKI = 1


class MatchingType(IntEnum):
    FULL = 0
    SHA2_256 = 1
    SHA2_512 = 2


_DIGEST_SIZE = {MatchingType.SHA2_256: 32, MatchingType.SHA2_512: 64}


@dataclass(frozen=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_rdata(cls, rdata: dns.rdtypes.ANY.TLSA.TLSA) -> TLSARecord:
        return cls(int(rdata.usage), int(rdata.selector), int(rdata.mtype), bytes(rdata.cert))

    @property
    def usable(self) -> bool:
        """RFC 7672 §3.1.3: only DANE-TA(2) and DANE-EE(3) with known parameters count;
        a digest of the wrong length can match nothing (RFC 7671 §5)."""
        if self.usage not in (Usage.DANE_TA, Usage.DANE_EE):
            return False
        if self.selector not in (Selector.CERT, Selector.SPKI):
            return False
        if self.mtype == MatchingType.FULL:
            return len(self.data) > 0
        size = _DIGEST_SIZE.get(MatchingType(self.mtype)) if self.mtype in (1, 2) else None
        return size is not None and len(self.data) == size

    def to_text(self) -> str:
        """Presentation form, as TLS-RPT's ``policy-string`` carries it (RFC 8460 §4.4)."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    def matches(self, cert: x509.Certificate) -> bool:
        if self.selector == Selector.CERT:
            blob = cert.public_bytes(serialization.Encoding.DER)
        else:
            blob = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return _digest(self.mtype, blob) == self.data


def _digest(mtype: int, blob: bytes) -> bytes:
    if mtype == MatchingType.SHA2_256:
        return hashlib.sha256(blob).digest()
    if mtype == MatchingType.SHA2_512:
        return hashlib.sha512(blob).digest()
    return blob


class DaneStatus(StrEnum):
    """What the TLSA lookup says about an MX host (RFC 7672 §2.1.1, §2.2)."""

    USABLE = "usable"  # authenticated TLSA records, at least one usable: authenticate
    UNUSABLE = "unusable"  # authenticated, none usable: TLS required, not authenticated
    NONE = "none"  # no authenticated TLSA records (absent, or an unsigned zone)
    FAILED = "failed"  # lookup failed where the host's zone is signed: do not use the host


@dataclass(frozen=True)
class TLSALookup:
    host: str  # the TLSA base domain (the MX host name)
    status: DaneStatus
    records: tuple[TLSARecord, ...] = ()  # every authenticated record, usable or not
    detail: str = ""

    @property
    def applies(self) -> bool:
        """Whether DANE governs this host: an authenticated, non-empty TLSA RRset."""
        return self.status in (DaneStatus.USABLE, DaneStatus.UNUSABLE)

    @property
    def usable_records(self) -> tuple[TLSARecord, ...]:
        return tuple(r for r in self.records if r.usable)

    def report_policy(self) -> ReportPolicy:
        """RFC 8460 §1.3: for DANE, the policy domain is the TLSA base domain."""
        return ReportPolicy(
            PolicyType.TLSA, self.host, tuple(r.to_text() for r in self.records), (self.host,)
        )


async def lookup_tlsa(resolver: Resolver, mx_host: str, port: int = 25) -> TLSALookup:
    """TLSA records for SMTP at ``mx_host`` (RFC 7672 §2.2.3: ``_25._tcp.HOST``).

    Only an authenticated answer makes DANE apply; an unauthenticated one (an unsigned
    zone, or a resolver that does not validate) is ignored. A failed lookup (SERVFAIL,
    which is how a validating resolver reports a bogus answer, or a timeout) is where a
    downgrade attack would hide (§2.1.1): when the host's own address records are
    authenticated, its zone is signed and the host is not used (status FAILED); when
    they are not, the zone is unsigned, TLSA records could not have been authenticated
    anyway, and DANE simply does not apply.

    Not done: TLSA at the CNAME-expanded host name first (§2.2.3); the lookup is at the
    MX name, whose CNAMEs the resolver follows.
    """
    host = normalize_host(mx_host)
    try:
        answer = await resolver.query_authenticated(f"_{port}._tcp.{host}", "TLSA")
    except TemporaryDNSError as exc:
        if await _addresses_secure(resolver, host):
            return TLSALookup(host, DaneStatus.FAILED, detail=f"TLSA lookup failed: {exc}")
        return TLSALookup(host, DaneStatus.NONE, detail="TLSA lookup failed; zone unsigned")
    records = tuple(
        TLSARecord.from_rdata(r) for r in answer.records if isinstance(r, dns.rdtypes.ANY.TLSA.TLSA)
    )
    if not answer.authenticated:
        detail = "TLSA answer not authenticated" if records else "no TLSA records"
        return TLSALookup(host, DaneStatus.NONE, detail=detail)
    if not records:
        return TLSALookup(host, DaneStatus.NONE, detail="no TLSA records (authenticated)")
    status = DaneStatus.USABLE if any(r.usable for r in records) else DaneStatus.UNUSABLE
    return TLSALookup(host, status, records)


async def _addresses_secure(resolver: Resolver, host: str) -> bool:
    for rtype in ("A", "AAAA"):
        try:
            answer = await resolver.query_authenticated(host, rtype)
        except TemporaryDNSError:
            continue
        if answer.records and answer.authenticated:
            return True
    return False


# -- matching a chain (RFC 7672 §3.1, RFC 7671 §5) -----------------------------------------


@dataclass(frozen=True)
class DaneResult:
    ok: bool
    result_type: ResultType | None = None  # for TLS-RPT when not ok
    detail: str = ""
    matched: TLSARecord | None = None


def verify_chain(
    tlsa_records: Iterable[TLSARecord],
    peer_cert_chain_der: Sequence[bytes],
    *,
    hostnames: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> DaneResult:
    """Authenticate a server's chain (leaf first, as sent) against TLSA records.

    DANE-EE(3): the leaf (or its key) matches; no name or validity checks (RFC 7672
    §3.1.1, the DNS binds the key to the host). DANE-TA(2): a certificate in the chain
    above the leaf, or for "2 1 0" a public key given in full, is the trust anchor; the
    leaf chains up to it by issuer name and signature, each issuer a CA, every
    certificate below the anchor within its validity, and the leaf carries one of
    ``hostnames`` (the MX host name; RFC 7672 §3.2.2), a wildcard covering one label
    (§3.2.3). Unusable records are skipped; with none usable, nothing authenticates.
    """
    records = [r for r in tlsa_records if r.usable]
    if not records:
        return DaneResult(False, ResultType.TLSA_INVALID, "no usable TLSA records")
    if not peer_cert_chain_der:
        return DaneResult(False, ResultType.VALIDATION_FAILURE, "no certificate presented")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in peer_cert_chain_der]
    except ValueError as exc:
        return DaneResult(False, ResultType.VALIDATION_FAILURE, f"unparsable certificate: {exc}")
    moment = now or dt.datetime.now(dt.UTC)
    leaf = chain[0]

    for record in records:
        if record.usage == Usage.DANE_EE and record.matches(leaf):
            return DaneResult(True, matched=record, detail="DANE-EE matched")

    failure: DaneResult | None = None
    for record in records:
        if record.usage != Usage.DANE_TA:
            continue
        for depth in range(1, len(chain)):
            if record.matches(chain[depth]):
                outcome = _check_path(chain[: depth + 1], None, hostnames, moment)
                if outcome.ok:
                    return DaneResult(
                        True, matched=record, detail=f"DANE-TA matched at depth {depth}"
                    )
                failure = failure or outcome
        # "2 1 0" publishes the anchor's whole key, so the anchor certificate itself may be
        # left out of the chain (RFC 7671 §5.2.2): the top certificate sent must be signed
        # by that key.
        if record.selector == Selector.SPKI and record.mtype == MatchingType.FULL:
            try:
                anchor_key = serialization.load_der_public_key(record.data)
            except ValueError:
                continue
            for top in range(len(chain)):
                outcome = _check_path(chain[: top + 1], anchor_key, hostnames, moment)
                if outcome.ok:
                    return DaneResult(True, matched=record, detail="DANE-TA key matched")
    if failure is not None:
        return DaneResult(False, failure.result_type, failure.detail)
    return DaneResult(False, ResultType.VALIDATION_FAILURE, "no TLSA record matches the chain")


def _check_path(
    path: Sequence[x509.Certificate],
    anchor_key: Any,
    hostnames: Sequence[str],
    now: dt.datetime,
) -> DaneResult:
    """``path`` runs from the leaf up to the anchor certificate (last) or, with
    ``anchor_key``, up to the certificate that key signed."""
    below_anchor = path if anchor_key is not None else path[:-1]
    for i, cert in enumerate(below_anchor):
        issuer_cert = path[i + 1] if i + 1 < len(path) else None
        if issuer_cert is not None:
            if cert.issuer != issuer_cert.subject:
                return DaneResult(False, ResultType.VALIDATION_FAILURE, "chain order broken")
            if not _is_ca(issuer_cert):
                return DaneResult(False, ResultType.VALIDATION_FAILURE, "issuer is not a CA")
            key = issuer_cert.public_key()
        else:
            key = anchor_key
        if not _signed_by(cert, key):
            return DaneResult(False, ResultType.VALIDATION_FAILURE, "bad signature in chain")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return DaneResult(False, ResultType.CERTIFICATE_EXPIRED, "certificate out of validity")
    if hostnames and not any(_cert_names_match(path[0], h) for h in hostnames):
        return DaneResult(
            False,
            ResultType.CERTIFICATE_HOST_MISMATCH,
            f"certificate names none of {', '.join(hostnames)}",
        )
    return DaneResult(True)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        # A v1 certificate (no extensions at all) predates basicConstraints; OpenSSL
        # accepts such issuers, and a DANE-TA record names it explicitly.
        return cert.version == x509.Version.v1


def _signed_by(cert: x509.Certificate, key: Any) -> bool:
    """Whether ``key`` made ``cert``'s signature (RSA PKCS#1 v1.5 or PSS, ECDSA,
    Ed25519, Ed448; the padding and hash come from the certificate itself)."""
    try:
        if isinstance(key, rsa.RSAPublicKey):
            pad = cert.signature_algorithm_parameters
            if not isinstance(pad, padding.PKCS1v15 | padding.PSS):
                return False
            hash_alg = cert.signature_hash_algorithm
            if hash_alg is None:
                return False
            key.verify(cert.signature, cert.tbs_certificate_bytes, pad, hash_alg)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            params = cert.signature_algorithm_parameters
            if not isinstance(params, ec.ECDSA):
                return False
            key.verify(cert.signature, cert.tbs_certificate_bytes, params)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _cert_names_match(cert: x509.Certificate, host: str) -> bool:
    try:
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        # RFC 6125 §6.4.4: the CN only when there is no DNS-ID at all.
        names = [
            str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return any(wildcard_match(name, host) for name in names)


def peer_chain_der(tls: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The chain the server sent, leaf first, DER-encoded.

    Python 3.13 has ``get_unverified_chain()``; 3.10 to 3.12 have it on the internal
    ``_sslobj`` only, returning certificate objects. Without either, the leaf alone (all
    DANE-EE needs).
    """
    getter = getattr(tls, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        out: list[bytes] = []
        for cert in chain:
            if isinstance(cert, bytes):
                out.append(cert)
            else:
                out.append(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
        if out:
            return out
    leaf = tls.getpeercert(binary_form=True)
    return [leaf] if leaf else []
