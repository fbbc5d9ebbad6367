"""SPF through the real DNS path: the RFC 7208 conformance suite and API behaviour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mailfort.auth.spf import DEFAULT_EXPLANATIONS, check_spf

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
SUITE = CORPORA / "spf" / "rfc7208-tests.yml"


def _zone(zonedata: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Suite zone data -> DNSServer entries.

    The suite writes policies as type SPF and expects drivers to publish them as TXT too,
    unless the name has its own TXT entries (that is how it tests record selection).
    "TXT: NONE" means "publish no TXT here" (so no copy of the SPF entries either).
    A TXT record with no strings at all (``SPF: []``, "null text") is not valid wire data:
    dnspython rejects the whole answer as FORMERR. It is published as one empty string,
    which keeps the case's point (a TXT record that is not an SPF record).
    """
    zone: dict[str, list[Any]] = {}
    for name, entries in zonedata.items():
        out: list[Any] = []
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        for entry in entries:
            if isinstance(entry, str):
                out.append(entry)  # TIMEOUT
                continue
            ((rtype, value),) = entry.items()
            if value == []:
                value = [""]
            if value == "NONE":
                continue  # only suppresses the generated TXT copy (has_txt is set)
            if rtype == "SPF":
                if not has_txt:
                    out.append(("TXT", value))
            else:
                out.append((rtype, value))
        zone[name] = out
    return zone


def _cases() -> list[Any]:
    cases = []
    for scenario in yaml.safe_load_all(SUITE.read_text()):
        zone = _zone(scenario["zonedata"])
        for name, case in scenario["tests"].items():
            cases.append(pytest.param(zone, case, id=name))
    return cases


CASES = _cases()


def test_suite_size() -> None:
    assert len(CASES) == 203


@pytest.mark.parametrize(("zone", "case"), CASES)
async def test_rfc7208_suite(dns_server: Any, zone: dict[str, Any], case: dict[str, Any]) -> None:
    dns_server.set_zone(zone)
    resolver = dns_server.make_resolver(timeout=0.5)
    res = await check_spf(resolver, case["host"], case["mailfrom"], case["helo"], check_helo=False)
    expected = case["result"]
    accepted = expected if isinstance(expected, list) else [expected]
    assert res.result in accepted, (res, case.get("description"))
    if "explanation" in case:
        want = case["explanation"]
        if want == "DEFAULT":
            want = DEFAULT_EXPLANATIONS[res.result]
        assert res.explanation == want
