"""The byte pipe under an IMAP or POP3 session: asyncio streams, STARTTLS, COMPRESS=DEFLATE.

Sessions write through :class:`StreamIO` and never see sockets, TLS or compression.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib

__all__ = ["ProtocolError", "StreamIO"]

READ_SIZE = 64 * 1024
# One inflate step yields at most this much: a small compressed input that expands to
# gigabytes is fed to the framer piece by piece, and the framer's limits stop it.
_INFLATE_STEP = 256 * 1024


class ProtocolError(Exception):
    """The peer broke the transport rules (e.g. sent plaintext behind STARTTLS)."""


class StreamIO:
    __slots__ = ("_deflate", "_inflate", "_pending", "closed", "reader", "tls_context", "writer")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.tls_context = tls_context
        self._deflate: zlib._Compress | None = None
        self._inflate: zlib._Decompress | None = None
        self._pending = b""
        self.closed = False

    @property
    def peer_ip(self) -> str:
        peer = self.writer.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return ""

    # -- output -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not data or self.closed:
            return
        if self._deflate is not None:
            # RFC 4978 §4: each response is flushed so the client can act on it.
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self.writer.write(data)

    async def drain(self) -> None:
        if not self.closed:
            await self.writer.drain()

    def buffered(self) -> int:
        transport = self.writer.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    # -- input ------------------------------------------------------------------------

    async def read(self) -> bytes:
        """The next input (inflated if COMPRESS is on); ``b""`` at the end."""
        if self._inflate is None:
            return await self.reader.read(READ_SIZE)
        while True:
            if self._pending:
                src, self._pending = self._pending, b""
            else:
                src = await self.reader.read(READ_SIZE)
                if not src:
                    return b""
            out = self._inflate.decompress(src, _INFLATE_STEP)
            self._pending = self._inflate.unconsumed_tail
            if out:
                return out
            if self._inflate.eof:
                return b""

    # -- mode switches ----------------------------------------------------------------

    async def start_tls(self) -> None:
        """Upgrade to TLS after the STARTTLS/STLS reply was written.

        RFC 3207-style injection (RFC 9051 §6.2.1, RFC 2595 §3.1): bytes that arrived in
        the clear after the command and before the handshake must not be read as if they
        came through TLS.  The session already dropped what it had read; anything the
        stream buffered since is refused here.
        """
        if self.tls_context is None:
            raise ProtocolError("TLS not configured")
        # StreamReader has no public way to peek at its buffer; _buffer is stable since 3.4.
        if getattr(self.reader, "_buffer", b""):
            raise ProtocolError("plaintext sent behind STARTTLS")
        await self.writer.drain()
        await self.writer.start_tls(self.tls_context)

    def start_compression(self, tail: bytes) -> None:
        """RFC 4978 §3: everything after the tagged OK is compressed both ways; ``tail``
        is input the session had already buffered, which is compressed too."""
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        self._pending = tail

    @property
    def tls_active(self) -> bool:
        return self.writer.get_extra_info("sslcontext") is not None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    def abort(self) -> None:
        self.closed = True
        transport = self.writer.transport
        if transport is not None:
            transport.abort()
