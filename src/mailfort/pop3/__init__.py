"""POP3 protocol core, free of I/O (RFC 1939, RFC 2449, RFC 2595, RFC 5034)."""

from mailfort.pop3.protocol import (
    AuthRequest,
    MaildropEntry,
    Pop3Connection,
    Pop3Policy,
    Pop3State,
    Quit,
    Retrieve,
    Send,
    StartTLS,
    dot_stuff,
)

__all__ = [
    "AuthRequest",
    "MaildropEntry",
    "Pop3Connection",
    "Pop3Policy",
    "Pop3State",
    "Quit",
    "Retrieve",
    "Send",
    "StartTLS",
    "dot_stuff",
]
