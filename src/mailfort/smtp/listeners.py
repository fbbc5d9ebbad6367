"""Listener factories for the SMTP ports, registered by the application."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from mailfort.smtp.inbound import InboundHandler, InboundPolicy
from mailfort.smtp.server import smtp_factory
from mailfort.smtp.submission import SubmissionHandler, SubmissionSMTP
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


async def _start_submission(services: Any, host: str, port: int, *, implicit: bool) -> int:
    settings = services.settings
    tls = server_context(settings.tls_cert, settings.tls_key)
    handler = SubmissionHandler(
        services.directory,
        services.store,
        services.queue,
        services.limits,
        settings.hostname,
        services.wake_engine,
    )
    if implicit:
        # aiosmtpd warns about AUTH without STARTTLS; on 465 TLS wraps the whole session.
        warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    factory = smtp_factory(
        handler,
        settings.hostname,
        tls,
        implicit_tls=implicit,
        # RFC 8314 §3.3 / RFC 6409: no credentials and no mail before TLS.
        require_starttls=not implicit,
        auth_required=True,
        auth_require_tls=not implicit,  # on 465 the whole connection is TLS already
        protocol=SubmissionSMTP,
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory, host, port, reuse_port=True, ssl=tls if implicit else None
    )
    services.servers.append(server)
    return int(server.sockets[0].getsockname()[1])


async def start_submission(services: Any, host: str, port: int) -> int:
    return await _start_submission(services, host, port, implicit=False)


async def start_submissions(services: Any, host: str, port: int) -> int:
    return await _start_submission(services, host, port, implicit=True)


def listeners() -> dict[str, Callable[[Any, str, int], Awaitable[int]]]:
    return {"smtp": start_mx, "submission": start_submission, "submissions": start_submissions}
