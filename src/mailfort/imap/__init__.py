"""IMAP4rev2 protocol core, free of I/O (RFC 9051 and extensions).

- :mod:`.wire` frames bytes into commands (literals, limits, IDLE/AUTHENTICATE modes);
- :mod:`.parser` turns framed commands into the typed values of :mod:`.commands`;
- :mod:`.response` builds and serialises responses;
- :mod:`.state` is the connection state machine and capability list;
- :mod:`.search` evaluates SEARCH programs against store messages;
- :mod:`.connection` ties them together into :class:`ImapConnection`.
"""

from mailfort.imap.connection import AuthResponse, CommandReceived, IdleEnded, ImapConnection, Send
from mailfort.imap.parser import ParseError, parse_command
from mailfort.imap.sequence import SequenceSet
from mailfort.imap.state import ImapSession, ServerPolicy, State
from mailfort.imap.wire import Framer, FramerMode, Limits

__all__ = [
    "AuthResponse",
    "CommandReceived",
    "Framer",
    "FramerMode",
    "IdleEnded",
    "ImapConnection",
    "ImapSession",
    "Limits",
    "ParseError",
    "Send",
    "SequenceSet",
    "ServerPolicy",
    "State",
    "parse_command",
]
