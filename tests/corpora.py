"""Where the shared third-party test corpora live, and Dovecot's reference.

In CI and here the repository clone sits beside `shared/`, so the corpora are
found relative to this file rather than the working directory.
"""

from __future__ import annotations

import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

_IMAPLIB_EOL = re.compile(rb"\r\n|\r(?!\n)|\n")

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
MIME = CORPORA / "mime"
DOVECOT_REFERENCE = MIME / "dovecot-2.3.19-reference.txt"
# CPython's email test messages ship with the interpreter's test package.
CPYTHON_EMAIL_DATA = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"

_PREFIXES = {
    "mime4j/": MIME / "mime4j",
    "stalwart-mail-parser-resources/": MIME / "stalwart-mail-parser",
    "cpython-test_email-data/": CPYTHON_EMAIL_DATA,
}


@dataclass(frozen=True)
class ReferenceCase:
    name: str  # the reference's own label, e.g. "mime4j/core/.../frag.msg"
    path: Path
    expected: str  # "N (RFC822.SIZE ... BODYSTRUCTURE (...))" as recorded

    def read_message(self) -> bytes:
        """The bytes Dovecot received for this case.

        The recorder dropped a leading mbox "From " line and APPENDed through
        `imaplib`, which turns every CR, LF and CRLF into CRLF.
        """
        data = self.path.read_bytes()
        if data.startswith(b"From "):
            nl = data.find(b"\n")
            data = data[nl + 1 :] if nl >= 0 else b""
        return _IMAPLIB_EOL.sub(b"\r\n", data)


def resolve(name: str) -> Path:
    for prefix, base in _PREFIXES.items():
        if name.startswith(prefix):
            return base / name[len(prefix) :]
    return MIME / name


def reference_cases() -> list[ReferenceCase]:
    """Entries of the Dovecot reference file.

    Format: a "== <name>" line, then the FETCH response as recorded through
    imaplib: each literal appears as "{N}" + its text + a newline, and 8-bit
    bytes were decoded as UTF-8 with U+FFFD replacement.
    """
    text = DOVECOT_REFERENCE.read_text("utf-8")
    cases: list[ReferenceCase] = []
    name: str | None = None
    body: list[str] = []
    for line in text.split("\n"):
        if line.startswith("== "):
            if name is not None:
                cases.append(ReferenceCase(name, resolve(name), "\n".join(body).rstrip("\n")))
            name, body = line[3:].strip(), []
        else:
            body.append(line)
    if name is not None:
        cases.append(ReferenceCase(name, resolve(name), "\n".join(body).rstrip("\n")))
    return cases
