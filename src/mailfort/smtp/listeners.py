"""Listener factories for the SMTP ports, registered by the application."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from mailfort.smtp.inbound import InboundHandler, InboundPolicy
from mailfort.smtp.server import smtp_factory
from mailfort.tls import server_context


async def start_mx(services: Any, host: str, port: int) -> int:
    settings = services.settings
    tls = server_context(settings.tls_cert, settings.tls_key)
    handler = InboundHandler(
        services.directory,
        services.store,
        services.resolver,
        InboundPolicy(
            hostname=settings.hostname,
            trusted_forwarders=frozenset(settings.trusted_forwarders),
        ),
    )
    loop = asyncio.get_running_loop()
    # SO_REUSEPORT: worker processes share the port and the kernel spreads connections.
    server = await loop.create_server(
        smtp_factory(handler, settings.hostname, tls), host, port, reuse_port=True
    )
    services.servers.append(server)
    return int(server.sockets[0].getsockname()[1])


def listeners() -> dict[str, Callable[[Any, str, int], Awaitable[int]]]:
    return {"smtp": start_mx}
