"""Listener factories for the SMTP ports, registered by the application."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from mailfort import delivery
from mailfort.guard.logins import node_guard
from mailfort.outbound.client import SessionPool
from mailfort.relay.contexts import pkix_context
from mailfort.relay.forward import Forwarder, SRSKeys
from mailfort.relay.mtasts import MTASTS, ReadThroughPolicyCache, SQLitePolicyCache
from mailfort.relay.tlspolicy import TLSPolicy
from mailfort.smtp import conncount
from mailfort.smtp.inbound import InboundHandler, InboundPolicy
from mailfort.smtp.server import ConnectionTable, smtp_factory
from mailfort.smtp.submission import SubmissionHandler
from mailfort.tls import server_context


def _bounce_sink(services: Any) -> Callable[[str, bytes], Awaitable[None]]:
    """Where the MX's own DSNs go: the sender's mailbox if ours, else the outbound queue."""
    return functools.partial(
        delivery.deliver_bounce, services.directory, services.store, services.queue
    )


def _forwarder(services: Any) -> Forwarder | None:
    settings = services.settings
    server_key = services.directory.server_key
    if server_key is None:
        return None
    resolver = services.resolver
    # The MTA-STS cache is the engine's (outbound.policy): one fetch serves both. TLS-RPT
    # counts are not kept for forwarded copies: writing them would put a record of each
    # forwarded message on disk.
    mtasts = MTASTS(
        resolver,
        ReadThroughPolicyCache(SQLitePolicyCache(settings.data_dir / "queue" / "mtasts.sqlite3")),
        ca_file=settings.outbound_ca_file,
        port=settings.mta_sts_port,
    )
    return Forwarder(
        services.directory,
        resolver,
        services.memo,
        SRSKeys(server_key.derive),
        hostname=settings.hostname,
        port=settings.outbound_port,
        tls=TLSPolicy(resolver, mtasts=mtasts, ca_file=settings.outbound_ca_file, plan_ttl=30.0),
        pool=SessionPool(),
        allow_private_webhooks=settings.allow_private_webhooks,
        webhook_ssl=pkix_context(settings.outbound_ca_file),
        bounce=_bounce_sink(services),
    )


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
        _forwarder(services),
        memo=services.memo,
        bounce=_bounce_sink(services),
    )
    loop = asyncio.get_running_loop()
    # The per-IP cap holds across the workers when the parent made a shared table before
    # forking them (mailfort.app); in one process the listener's own table is the node's.
    shared = conncount.node_table()
    connections = None if shared is None else ConnectionTable(shared, services.worker_index)
    # SO_REUSEPORT: worker processes share the port and the kernel spreads connections.
    server = await loop.create_server(
        smtp_factory(handler, settings.hostname, tls, connections=connections, chunking=True),
        host,
        port,
        reuse_port=True,
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
        guard=node_guard(getattr(services, "memo", None), services.directory.server_key),
    )
    factory = smtp_factory(
        handler,
        settings.hostname,
        tls,
        implicit_tls=implicit,
        # RFC 8314 §3.3 / RFC 6409: no credentials and no mail before TLS.
        require_starttls=not implicit,
        auth_required=True,
        auth_require_tls=True,  # on 465 the whole connection is TLS already
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
