"""Content-Transfer-Encoding decoders (RFC 2045 §6.7, §6.8), lenient.

Mail in the wild breaks both encodings; these decoders keep going: bytes that
are not valid encoding are passed through (quoted-printable) or skipped
(base64) rather than failing the whole part.
"""

from __future__ import annotations

import binascii
import re

_HEX = b"0123456789ABCDEFabcdef"
_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")


def decode_qp(data: bytes) -> bytes:
    """Quoted-printable (RFC 2045 §6.7); line breaks come out as CRLF."""
    out = bytearray()
    lines = data.split(b"\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if line.endswith(b"\r"):
            line = line[:-1]
        # Rule 3: trailing whitespace is padding added in transport.
        line = line.rstrip(b" \t")
        soft = line.endswith(b"=")
        if soft:
            line = line[:-1]
        if b"=" in line:
            j = 0
            n = len(line)
            while j < n:
                k = line.find(b"=", j)
                if k < 0:
                    out += line[j:]
                    break
                out += line[j:k]
                h = line[k + 1 : k + 3]
                if len(h) == 2 and h[0] in _HEX and h[1] in _HEX:
                    out.append(int(h, 16))
                    j = k + 3
                else:
                    out.append(0x3D)
                    j = k + 1
        else:
            out += line
        if i < last and not soft:
            out += b"\r\n"
    return bytes(out)


def decode_base64(data: bytes) -> bytes:
    """Base64 (RFC 2045 §6.8); characters outside the alphabet are ignored,
    and decoding stops at the first padding "=" as the RFC says it ends data.
    """
    pad = data.find(b"=")
    if pad >= 0:
        data = data[:pad]
    clean = _B64_JUNK.sub(b"", data)
    extra = len(clean) % 4
    if extra == 1:
        clean = clean[:-1]
    elif extra:
        clean += b"=" * (4 - extra)
    try:
        return binascii.a2b_base64(clean)
    except binascii.Error:  # pragma: no cover - input is sanitised above
        return b""
