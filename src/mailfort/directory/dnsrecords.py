"""Every DNS record a hosted domain needs, as zone-file lines (`NAME TTL IN TYPE VALUE`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from mailfort.directory.dkimkeys import dns_value
from mailfort.directory.service import DkimKey

TTL = 3600


@dataclass(frozen=True)
class Record:
    name: str
    type: str
    value: str
    ttl: int = TTL

    def zone_line(self) -> str:
        return f"{self.name}. {self.ttl} IN {self.type} {self.value}"


def _txt(value: str) -> str:
    """RFC 1035 §3.3.14: character-strings of at most 255 octets, quoted."""
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


def mta_sts_policy(hostname: str) -> str:
    """The policy served at https://mta-sts.DOMAIN/.well-known/mta-sts.txt (RFC 8461 §3.2)."""
    return f"version: STSv1\r\nmode: enforce\r\nmx: {hostname.rstrip('.')}\r\nmax_age: 604800\r\n"


def mta_sts_id(policy: str) -> str:
    """RFC 8461 §3.1: the id changes whenever the policy does; a digest of it does that."""
    return hashlib.sha256(policy.encode()).hexdigest()[:32]


def records(domain: str, hostname: str, dkim: Iterable[DkimKey]) -> list[Record]:
    host = hostname.rstrip(".")
    sts_id = mta_sts_id(mta_sts_policy(host))
    out = [
        Record(domain, "MX", f"10 {host}."),
        # RFC 7208: only our MX sends for the domain.
        Record(domain, "TXT", _txt("v=spf1 mx -all")),
    ]
    out += [
        Record(
            f"{k.selector}._domainkey.{domain}", "TXT", _txt(dns_value(k.algorithm, k.public_b64))
        )
        for k in dkim
    ]
    out += [
        # RFC 7489: start at quarantine; aggregate reports to the domain's postmaster.
        Record(
            f"_dmarc.{domain}",
            "TXT",
            _txt(f"v=DMARC1; p=quarantine; adkim=r; aspf=r; rua=mailto:postmaster@{domain}"),
        ),
        # RFC 8461: the policy itself is served at https://mta-sts.DOMAIN/.well-known/.
        Record(f"_mta-sts.{domain}", "TXT", _txt(f"v=STSv1; id={sts_id}")),
        Record(f"mta-sts.{domain}", "CNAME", f"{host}."),
        # RFC 8460: TLS reports to the domain's postmaster.
        Record(f"_smtp._tls.{domain}", "TXT", _txt(f"v=TLSRPTv1; rua=mailto:postmaster@{domain}")),
    ]
    # RFC 6186 (and RFC 8314 §5.1 for the implicit-TLS services): client autoconfiguration.
    for service, port in (
        ("submissions", 465),
        ("submission", 587),
        ("imaps", 993),
        ("imap", 143),
        ("pop3s", 995),
        ("pop3", 110),
    ):
        out.append(Record(f"_{service}._tcp.{domain}", "SRV", f"0 1 {port} {host}."))
    return out
