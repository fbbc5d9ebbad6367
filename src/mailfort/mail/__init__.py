"""Message parsing for IMAP, done once at delivery (sans-IO, never raises).

`parse_message` builds the MIME tree with byte offsets; `envelope`, `body`
and `bodystructure` render Dovecot-identical FETCH values; `section` and
`binary_section` cut FETCH BODY[...] / BINARY[...] data out of the stored
message; `extract_meta` gathers what the store indexes.
"""

from ._rfc822 import Address
from .imap import body, bodystructure, envelope, rfc822_size, to_wire
from .meta import MessageMeta, decode_header, extract_meta, parse_date
from .parser import (
    BodyFields,
    Envelope,
    Flags,
    ParsedMessage,
    Part,
    parse_message,
    to_crlf,
)
from .section import (
    SectionSpec,
    UnknownCTEError,
    apply_partial,
    binary_section,
    binary_size,
    parse_partial,
    parse_section,
    section,
    section_size,
)

__all__ = [
    "Address",
    "BodyFields",
    "Envelope",
    "Flags",
    "MessageMeta",
    "ParsedMessage",
    "Part",
    "SectionSpec",
    "UnknownCTEError",
    "apply_partial",
    "binary_section",
    "binary_size",
    "body",
    "bodystructure",
    "decode_header",
    "envelope",
    "extract_meta",
    "parse_date",
    "parse_message",
    "parse_partial",
    "parse_section",
    "rfc822_size",
    "section",
    "section_size",
    "to_crlf",
    "to_wire",
]
