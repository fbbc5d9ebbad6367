"""ARC validation (RFC 8617) through the real DNS path: the ValiMail validation suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mailfort.auth.arc import verify_arc

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
SUITE = CORPORA / "arc" / "arc-draft-validation-tests.yml"


def _cases() -> list[Any]:
    cases = []
    for scenario in yaml.safe_load_all(SUITE.read_text()):
        # Folded YAML turns the key records' line breaks into spaces inside p=; DKIM key
        # records allow whitespace there (RFC 6376 §3.6.1), so they are served as written.
        zone = {name: [("TXT", text)] for name, text in scenario["txt-records"].items()}
        for name, case in scenario["tests"].items():
            cases.append(pytest.param(zone, case, id=name))
    return cases


CASES = _cases()


def _expected(cv: Any) -> str:
    # The suite writes Pass/Fail/None. Three cases say "" (a seal recorded cv=fail, so
    # the chain is already broken and no new verdict is defined): for a receiver that is a
    # chain that does not pass, i.e. fail (RFC 8617 §5.2 step 2).
    text = str(cv).strip().lower()
    return text or "fail"


def test_suite_size() -> None:
    assert len(CASES) == 171


@pytest.mark.parametrize(("zone", "case"), CASES)
async def test_arc_validation_suite(
    dns_server: Any, zone: dict[str, Any], case: dict[str, Any]
) -> None:
    dns_server.set_zone(zone)
    message = case["message"].replace("\r\n", "\n").replace("\n", "\r\n").encode()
    result = await verify_arc(dns_server.resolver, message)
    assert result.cv == _expected(case["cv"]), (case.get("description"), result.reason)
    assert not result.temperror


async def test_sealers_and_trust(dns_server: Any) -> None:
    scenario = next(yaml.safe_load_all(SUITE.read_text()))
    dns_server.set_zone({n: [("TXT", t)] for n, t in scenario["txt-records"].items()})
    case = scenario["tests"]["cv_pass_i2_1"]
    message = case["message"].replace("\n", "\r\n").encode()
    result = await verify_arc(dns_server.resolver, message)
    assert result.cv == "pass"
    assert result.sealers == ("example.org", "example.org")
    assert result.latest_sealer == "example.org"
    assert result.oldest_pass == 0
    vouched = result.vouched_by({"example.org"})
    assert vouched is not None and vouched.instance == 2
    assert "lists.example.org" in vouched.aar
    assert result.vouched_by({"other.example"}) is None


async def test_key_timeout_is_temporary(dns_server: Any) -> None:
    scenario = next(yaml.safe_load_all(SUITE.read_text()))
    dns_server.set_zone({"dummy._domainkey.example.org": ["TIMEOUT"]})
    case = scenario["tests"]["cv_pass_i1_1"]
    message = case["message"].replace("\n", "\r\n").encode()
    result = await verify_arc(dns_server.make_resolver(timeout=0.3), message)
    assert result.cv == "fail"
    assert result.temperror
