"""DANE (RFC 7672/6698/7671): TLSA matching on real certificate chains, and TLSA lookups
through the loopback DNS server with and without the AD bit."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailfort.relay.dane import (
    DaneStatus,
    TLSARecord,
    lookup_tlsa,
    verify_chain,
)
from mailfort.relay.tlsrpt import PolicyType, ResultType
from test_relay_support import CA, NOW, PKI, Issued

from conftest_dns import DNSFixture
from dnsserver import Entry

MX = "mx1.example.test"


def spki(issued: Issued | CA) -> bytes:
    return issued.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def der(issued: Issued | CA) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.DER)


def rec(usage: int, selector: int, mtype: int, blob: bytes) -> TLSARecord:
    data = {0: blob, 1: hashlib.sha256(blob).digest(), 2: hashlib.sha512(blob).digest()}[mtype]
    return TLSARecord(usage, selector, mtype, data)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def intermediate(pki: PKI) -> CA:
    return CA("Test Intermediate", parent=pki.root)


@pytest.fixture(scope="module")
def leaf(intermediate: CA) -> Issued:
    return intermediate.issue([MX])


# -- records ------------------------------------------------------------------------------


def test_usable_records() -> None:
    assert TLSARecord(3, 1, 1, b"\0" * 32).usable
    assert TLSARecord(2, 0, 2, b"\0" * 64).usable
    assert TLSARecord(3, 0, 0, b"\x30").usable
    assert not TLSARecord(0, 0, 1, b"\0" * 32).usable  # PKIX-TA: unusable for SMTP
    assert not TLSARecord(1, 1, 1, b"\0" * 32).usable  # PKIX-EE: likewise
    assert not TLSARecord(4, 1, 1, b"\0" * 32).usable
    assert not TLSARecord(3, 2, 1, b"\0" * 32).usable
    assert not TLSARecord(3, 1, 3, b"\0" * 32).usable
    assert not TLSARecord(3, 1, 1, b"\0" * 31).usable  # wrong digest length
    assert not TLSARecord(3, 1, 2, b"\0" * 32).usable
    assert TLSARecord(3, 1, 1, bytes.fromhex("ab" * 32)).to_text() == "3 1 1 " + "ab" * 32


# -- DANE-EE ------------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "mtype"), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_dane_ee_matches(leaf: Issued, selector: int, mtype: int) -> None:
    blob = der(leaf) if selector == 0 else spki(leaf)
    result = verify_chain([rec(3, selector, mtype, blob)], leaf.chain_der())
    assert result.ok and result.matched is not None and result.matched.usage == 3


def test_dane_ee_ignores_names_and_expiry(pki: PKI) -> None:
    # RFC 7672 §3.1.1: the DNS binds the key to the host; neither the certificate's
    # names nor its dates matter, and neither does who issued it.
    odd = pki.other.issue(
        ["somewhere.else.test"],
        not_before=NOW - dt.timedelta(days=400),
        not_after=NOW - dt.timedelta(days=30),
    )
    assert verify_chain([rec(3, 1, 1, spki(odd))], odd.chain_der(), hostnames=[MX]).ok


def test_dane_ee_mismatch(pki: PKI, leaf: Issued) -> None:
    other = pki.root.issue([MX])
    result = verify_chain([rec(3, 1, 1, spki(other))], leaf.chain_der(), hostnames=[MX])
    assert not result.ok and result.result_type is ResultType.VALIDATION_FAILURE


def test_one_matching_record_is_enough(pki: PKI, leaf: Issued) -> None:
    other = pki.root.issue([MX])
    records = [rec(3, 1, 1, spki(other)), rec(1, 1, 1, spki(leaf)), rec(3, 0, 1, der(leaf))]
    assert verify_chain(records, leaf.chain_der()).ok


def test_pkix_usages_are_not_used(leaf: Issued) -> None:
    result = verify_chain([rec(1, 1, 1, spki(leaf)), rec(0, 0, 1, der(leaf))], leaf.chain_der())
    assert not result.ok and result.result_type is ResultType.TLSA_INVALID


# -- DANE-TA ------------------------------------------------------------------------------


def test_dane_ta_intermediate(intermediate: CA, leaf: Issued) -> None:
    for selector, blob in ((0, der(intermediate)), (1, spki(intermediate))):
        result = verify_chain([rec(2, selector, 1, blob)], leaf.chain_der(), hostnames=[MX])
        assert result.ok, result.detail


def test_dane_ta_root_in_chain(pki: PKI, leaf: Issued) -> None:
    chain = leaf.chain_der(with_root=pki.root.cert)
    assert verify_chain([rec(2, 0, 2, der(pki.root))], chain, hostnames=[MX]).ok
    # The root must be sent when the record names its certificate digest.
    assert not verify_chain([rec(2, 0, 2, der(pki.root))], leaf.chain_der(), hostnames=[MX]).ok


def test_dane_ta_full_key_without_anchor_in_chain(pki: PKI, intermediate: CA, leaf: Issued) -> None:
    # "2 1 0": the anchor's whole key is in DNS, so the server may leave it out.
    assert verify_chain([rec(2, 1, 0, spki(pki.root))], leaf.chain_der(), hostnames=[MX]).ok
    direct = pki.root.issue([MX])
    assert verify_chain([rec(2, 1, 0, spki(pki.root))], direct.chain_der(), hostnames=[MX]).ok
    assert not verify_chain([rec(2, 1, 0, spki(pki.other))], leaf.chain_der(), hostnames=[MX]).ok


def test_dane_ta_checks_names(intermediate: CA) -> None:
    wrong = intermediate.issue(["other.example.test"])
    result = verify_chain([rec(2, 1, 1, spki(intermediate))], wrong.chain_der(), hostnames=[MX])
    assert not result.ok and result.result_type is ResultType.CERTIFICATE_HOST_MISMATCH
    wildcard = intermediate.issue(["*.example.test"])
    assert verify_chain([rec(2, 1, 1, spki(intermediate))], wildcard.chain_der(), hostnames=[MX]).ok
    deep = intermediate.issue(["*.test"])
    assert not verify_chain([rec(2, 1, 1, spki(intermediate))], deep.chain_der(), hostnames=[MX]).ok
    # Only with no DNS SAN at all does the CN count (RFC 6125 §6.4.4).
    cn_only = intermediate.issue([MX], san=False)
    assert verify_chain([rec(2, 1, 1, spki(intermediate))], cn_only.chain_der(), hostnames=[MX]).ok


def test_dane_ta_checks_validity(intermediate: CA) -> None:
    expired = intermediate.issue(
        [MX], not_before=NOW - dt.timedelta(days=60), not_after=NOW - dt.timedelta(days=1)
    )
    result = verify_chain([rec(2, 1, 1, spki(intermediate))], expired.chain_der(), hostnames=[MX])
    assert not result.ok and result.result_type is ResultType.CERTIFICATE_EXPIRED


def test_dane_ta_checks_signatures(pki: PKI, intermediate: CA) -> None:
    # A leaf from another CA, sent with the named anchor after it: names may line up
    # (same issuer CN), but the signature does not.
    impostor_ca = CA("Test Intermediate")  # same subject, different key
    forged = impostor_ca.issue([MX])
    chain = [forged.der(), der(intermediate)]
    result = verify_chain([rec(2, 1, 1, spki(intermediate))], chain, hostnames=[MX])
    assert not result.ok and result.result_type is ResultType.VALIDATION_FAILURE
    # A leaf may not act as an issuer, even with the right name and a good signature.
    fake_ca = intermediate.issue(["fake-ca.test"])
    child_key = ec.generate_private_key(ec.SECP256R1())
    child = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MX)]))
        .issuer_name(fake_ca.cert.subject)
        .public_key(child_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(MX)]), critical=False)
        .sign(fake_ca.key, hashes.SHA256())
    )
    chain = [child.public_bytes(serialization.Encoding.DER), fake_ca.der()]
    result = verify_chain([rec(2, 0, 1, fake_ca.der())], chain, hostnames=[MX])
    assert not result.ok and "not a CA" in result.detail


def test_rsa_chain(tmp_path: Path) -> None:
    root = CA("RSA Root", kind="rsa")
    leaf = root.issue([MX], kind="rsa")
    chain = leaf.chain_der(with_root=root.cert)
    assert verify_chain([rec(2, 1, 1, spki(root))], chain, hostnames=[MX]).ok
    assert verify_chain([rec(2, 1, 0, spki(root))], leaf.chain_der(), hostnames=[MX]).ok
    assert verify_chain([rec(3, 1, 1, spki(leaf))], [leaf.der()]).ok


def test_garbage_chain(leaf: Issued) -> None:
    result = verify_chain([rec(3, 1, 1, spki(leaf))], [b"not a certificate"])
    assert not result.ok and result.result_type is ResultType.VALIDATION_FAILURE
    assert not verify_chain([rec(3, 1, 1, spki(leaf))], []).ok


# -- lookups through DNS ----------------------------------------------------------------------


def tlsa_zone(
    leaf: Issued, *markers: str, extra: list[Entry] | None = None
) -> dict[str, list[Entry]]:
    entries: list[Entry] = [("TLSA", (3, 1, 1, hashlib.sha256(spki(leaf)).digest())), *markers]
    return {f"_25._tcp.{MX}": entries + (extra or []), MX: [("A", "127.0.0.1")]}


async def test_authenticated_tlsa_applies(dns_server: DNSFixture, leaf: Issued) -> None:
    dns_server.set_zone(tlsa_zone(leaf, "SECURE"))
    lookup = await lookup_tlsa(dns_server.resolver, MX + ".")
    assert lookup.status is DaneStatus.USABLE and lookup.applies
    assert lookup.host == MX
    assert verify_chain(lookup.usable_records, leaf.chain_der()).ok
    policy = lookup.report_policy()
    assert policy.policy_type is PolicyType.TLSA and policy.policy_domain == MX
    assert policy.policy_strings == (lookup.records[0].to_text(),) and policy.mx_hosts == (MX,)


async def test_unauthenticated_tlsa_is_ignored(dns_server: DNSFixture, leaf: Issued) -> None:
    dns_server.set_zone(tlsa_zone(leaf))  # same records, no AD bit
    lookup = await lookup_tlsa(dns_server.resolver, MX)
    assert lookup.status is DaneStatus.NONE and not lookup.applies
    assert lookup.records == ()


async def test_only_unusable_records(dns_server: DNSFixture, leaf: Issued) -> None:
    dns_server.set_zone(
        {f"_25._tcp.{MX}": [("TLSA", (1, 1, 1, hashlib.sha256(spki(leaf)).digest())), "SECURE"]}
    )
    lookup = await lookup_tlsa(dns_server.resolver, MX)
    assert lookup.status is DaneStatus.UNUSABLE and lookup.applies and lookup.usable_records == ()


async def test_no_tlsa(dns_server: DNSFixture) -> None:
    dns_server.set_zone({"example.test": ["SECURE"], MX: [("A", "127.0.0.1")]})
    lookup = await lookup_tlsa(dns_server.resolver, MX)
    assert lookup.status is DaneStatus.NONE


async def test_failed_lookup_in_signed_zone_blocks_host(dns_server: DNSFixture) -> None:
    # SERVFAIL is how a validating resolver answers a bogus RRset. The host's address is
    # authenticated, so its zone is signed: no downgrade to unauthenticated TLS.
    dns_server.set_zone({f"_25._tcp.{MX}": ["SERVFAIL"], MX: [("A", "127.0.0.1"), "SECURE"]})
    lookup = await lookup_tlsa(dns_server.resolver, MX)
    assert lookup.status is DaneStatus.FAILED and not lookup.applies


async def test_failed_lookup_in_unsigned_zone_is_no_dane(dns_server: DNSFixture) -> None:
    dns_server.set_zone({f"_25._tcp.{MX}": ["SERVFAIL"], MX: [("A", "127.0.0.1")]})
    lookup = await lookup_tlsa(dns_server.resolver, MX)
    assert lookup.status is DaneStatus.NONE


# -- the resolver's AD handling ----------------------------------------------------------------


async def test_query_authenticated(dns_server: DNSFixture) -> None:
    dns_server.set_zone(
        {
            "signed.test": ["SECURE"],
            "a.signed.test": [("A", "192.0.2.1")],
            "alias.signed.test": [("CNAME", "b.unsigned.test")],
            "b.unsigned.test": [("A", "192.0.2.2")],
            "c.unsigned.test": [("TXT", "x")],
        }
    )
    res = dns_server.resolver
    got = await res.query_authenticated("a.signed.test", "A")
    assert got.authenticated and [r.to_text() for r in got.records] == ["192.0.2.1"]
    assert not (await res.query_authenticated("c.unsigned.test", "TXT")).authenticated
    # A CNAME into an unsigned zone is only as secure as its weakest link.
    chased = await res.query_authenticated("alias.signed.test", "A")
    assert chased.records and not chased.authenticated
    # A validated denial: NODATA and NXDOMAIN below a signed name.
    nodata = await res.query_authenticated("a.signed.test", "TLSA")
    assert nodata.records == [] and nodata.authenticated
    nx = await res.query_authenticated("missing.signed.test", "A")
    assert nx.records == [] and nx.authenticated
    # The ordinary lookups are unchanged: no AD requested, none given.
    assert [r.to_text() for r in await res.query("a.signed.test", "A")] == ["192.0.2.1"]


def test_server_sets_ad_only_when_asked(dns_server: DNSFixture) -> None:
    from dnslib import DNSRecord

    dns_server.set_zone({"a.signed.test": [("A", "192.0.2.1"), "SECURE"]})
    plain = DNSRecord.question("a.signed.test", "A")
    reply = DNSRecord.parse(dns_server.server.answer(bytes(plain.pack()), "udp") or b"")
    assert reply.header.ad == 0
    plain.header.ad = 1
    reply = DNSRecord.parse(dns_server.server.answer(bytes(plain.pack()), "udp") or b"")
    assert reply.header.ad == 1
