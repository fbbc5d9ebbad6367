"""The life cycle the IMAP and POP3 servers share: a listening socket, its sessions, an
idle sweep, releasing mailboxes even while stopping, and a goodbye at shutdown.

Each server keeps what differs (its protocol loop, its timeouts, its goodbye line); this
holds what both did alike, so that a fix to stopping or releasing reaches both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0


class SessionServer:
    """Base of a stream server whose sessions hold mailboxes (`ImapServer`, `Pop3Server`).

    Subclasses provide ``handle`` (the per-connection coroutine), ``_sweep`` (the idle
    timer loop), ``goodbye`` (written to every client at shutdown) and
    ``shutdown_timeout``, and keep their live sessions in ``self.live``: objects with the
    session's ``io`` (written to) and the ``task`` serving it.
    """

    goodbye: bytes = b""
    shutdown_timeout: float = 5.0

    def __init__(self, tls_context: ssl.SSLContext | None, *, implicit_tls: bool) -> None:
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.live: set[Any] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._releasing: set[asyncio.Future[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _sweep(self) -> None:
        raise NotImplementedError

    async def _release(self, closing: Coroutine[Any, Any, None], what: str) -> None:
        """Let go of a session's mailbox even if the server is stopping meanwhile: the
        release runs as its own task, which `wait_closed` waits for. The handler itself
        never ends cancelled (asyncio's stream callback would log that)."""
        task = asyncio.ensure_future(closing)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("releasing a %s session failed", what)

    async def start(self, host: str, port: int) -> Listener:
        ssl_ctx = self.tls_context if self.implicit_tls else None
        server = await asyncio.start_server(
            self.handle,
            host,
            port,
            ssl=ssl_ctx,
            reuse_port=True,  # worker processes share the port (app._run_workers)
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if ssl_ctx is not None else None,
        )
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return Listener(server, self)

    def shutdown(self) -> None:
        """Say goodbye to every client and end their sessions (SIGTERM)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session in list(self.live):
            with contextlib.suppress(Exception):
                session.io.write(self.goodbye)
            if session.task is not None:
                session.task.cancel()

    async def wait_closed(self) -> None:
        tasks: list[asyncio.Future[Any]] = [s.task for s in self.live if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.shutdown_timeout)
        if self._releasing:
            await asyncio.wait(list(self._releasing), timeout=self.shutdown_timeout)


class Listener(asyncio.AbstractServer):
    """The listening socket plus its sessions: closing it ends both (SIGTERM)."""

    def __init__(self, server: asyncio.Server, owner: SessionServer) -> None:
        self.server = server
        self.owner = owner

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        self.server.close()
        self.owner.shutdown()

    async def wait_closed(self) -> None:
        await self.owner.wait_closed()
        await self.server.wait_closed()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.server.get_loop()

    def is_serving(self) -> bool:
        return self.server.is_serving()

    async def start_serving(self) -> None:
        await self.server.start_serving()

    async def serve_forever(self) -> None:
        await self.server.serve_forever()


__all__ = ["Listener", "SessionServer"]
