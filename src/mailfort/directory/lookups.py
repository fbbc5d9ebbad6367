"""Per-worker caches in front of the directory for the SMTP listeners' hot paths.

Each directory lookup is a thread hand-off and a few queries; an MX or a submission
server asks the same few questions many times a second. The answers are kept only as long
as they are known to be right.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from mailfort.directory.service import Directory, Route, SigningKey

ROUTE_CACHE_SIZE = 4096
T = TypeVar("T")
KEY_CACHE_SECONDS = 60.0


class RouteCache:
    """`Directory.route` answers by address, valid while the directory's change marker stays
    what it was when they were looked up (see `Directory.change_marker`); without a marker
    (PostgreSQL) every call asks the directory."""

    def __init__(self, directory: Directory, size: int = ROUTE_CACHE_SIZE) -> None:
        self.directory = directory
        self.size = size
        self._routes: OrderedDict[str, Route] = OrderedDict()
        self._marker: Hashable | None = None

    def cached(self, address: str) -> Route | None:
        """The route if a cached one is still valid, else None (`route` looks it up)."""
        if self._current_marker() is None:
            return None
        return self._held(address.lower())

    async def route(self, address: str) -> Route:
        marker = self._current_marker()  # before the lookup: see its docstring
        if marker is None:
            return await asyncio.to_thread(self.directory.route, address)
        key = address.lower()  # Directory.route ignores case too
        route = self._held(key)
        if route is not None:
            return route
        route = await asyncio.to_thread(self.directory.route, address)
        # Another lookup may have seen a newer marker meanwhile: this answer may predate it.
        if self._marker == marker:
            self._routes[key] = route
            if len(self._routes) > self.size:
                self._routes.popitem(last=False)
        return route

    def _current_marker(self) -> Hashable | None:
        """The directory's marker now; the routes held under an older one are dropped."""
        marker = self.directory.change_marker()
        if marker is not None and marker != self._marker:
            self._routes.clear()
            self._marker = marker
        return marker

    def _held(self, key: str) -> Route | None:
        route = self._routes.get(key)
        if route is not None:
            self._routes.move_to_end(key)
        return route


class PerDomain(Generic[T]):
    """A per-domain directory answer for ``ttl`` seconds (a minute: a DKIM rotation or a
    new webhook secret takes effect within it); the lookup runs off the event loop."""

    def __init__(self, lookup: Callable[[str], T], ttl: float = KEY_CACHE_SECONDS) -> None:
        self.lookup = lookup
        self.ttl = ttl
        self._held: dict[str, tuple[float, T]] = {}

    async def get(self, domain: str) -> T:
        now = time.monotonic()
        held = self._held.get(domain)
        if held is not None and held[0] > now:
            return held[1]
        value = await asyncio.to_thread(self.lookup, domain)
        if len(self._held) > 4096:
            self._held.clear()
        self._held[domain] = (now + self.ttl, value)
        return value


def signing_keys(directory: Directory) -> PerDomain[list[SigningKey]]:
    """A domain's unsealed DKIM keys, Ed25519 first."""
    return PerDomain(directory.signing_keys)
