"""pytest plugin: a real DNS server on loopback for every test that asks for `dns_server`.

Register it from the top-level conftest (``pytest_plugins = ["conftest_dns"]``). One server
runs per test session (per xdist worker); each test starts with an empty zone.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailfort.dns import Nameserver, Resolver

from dnsserver import DNSServer, Zone


class DNSFixture:
    """What a test gets: the server's port, zone control, and resolvers pointed at it."""

    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.port = server.port
        # Loopback answers take well under a millisecond; a short timeout keeps the
        # deliberate-timeout cases (zone entry "TIMEOUT") fast.
        self.resolver = self.make_resolver(timeout=1.0)

    def make_resolver(self, timeout: float = 1.0) -> Resolver:
        return Resolver([Nameserver(self.server.host, self.port)], timeout=timeout)

    def set_zone(self, records: Zone) -> None:
        self.server.set_zone(records)

    def add_records(self, records: Zone) -> None:
        self.server.add_records(records)

    @property
    def queries(self) -> list[tuple[str, str, str]]:
        return self.server.queries


@pytest.fixture(scope="session")
def _dns_server_instance() -> Iterator[DNSServer]:
    server = DNSServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def dns_server(_dns_server_instance: DNSServer) -> Iterator[DNSFixture]:
    _dns_server_instance.clear()
    yield DNSFixture(_dns_server_instance)
    _dns_server_instance.clear()
