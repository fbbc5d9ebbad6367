"""Per-worker caches in front of the directory for the SMTP listeners' hot paths.

Each directory lookup is a thread hand-off and a few queries; an MX or a submission
server asks the same few questions many times a second. The answers are kept only as long
as they are known to be right.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Hashable

from mailfort.directory.service import Directory, Route, SigningKey

ROUTE_CACHE_SIZE = 4096
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

    async def route(self, address: str) -> Route:
        marker = self.directory.change_marker()  # before the lookup: see its docstring
        if marker is None:
            return await asyncio.to_thread(self.directory.route, address)
        if marker != self._marker:
            self._routes.clear()
            self._marker = marker
        key = address.lower()  # Directory.route ignores case too
        route = self._routes.get(key)
        if route is not None:
            self._routes.move_to_end(key)
            return route
        route = await asyncio.to_thread(self.directory.route, address)
        # Another lookup may have seen a newer marker meanwhile: this answer may predate it.
        if self._marker == marker:
            self._routes[key] = route
            if len(self._routes) > self.size:
                self._routes.popitem(last=False)
        return route


class SigningKeyCache:
    """A domain's unsealed DKIM keys for a minute: a rotation takes effect within it."""

    def __init__(self, directory: Directory, ttl: float = KEY_CACHE_SECONDS) -> None:
        self.directory = directory
        self.ttl = ttl
        self._keys: dict[str, tuple[float, list[SigningKey]]] = {}

    async def keys(self, domain: str) -> list[SigningKey]:
        now = time.monotonic()
        cached = self._keys.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        keys = await asyncio.to_thread(self.directory.signing_keys, domain)
        if len(self._keys) > 4096:
            self._keys.clear()
        self._keys[domain] = (now + self.ttl, keys)
        return keys
