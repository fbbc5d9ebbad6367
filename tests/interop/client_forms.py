"""What a client that re-generates messages writes to disk, computed by that client's own code.

offlineimap3 and getmail6 parse every message with Python's `email` package and write out
what its generator produces, which re-folds headers, adds missing closing boundaries and so
on. Their copies are compared with the same transformation applied to the original message,
run by the client's own interpreter (Debian's /usr/bin/python3, not the test venv: the
`email` package differs between patch releases) and, where possible, the client's own code.

Run as a script: `client_forms.py MODE DIR` prints {file name: sha256 of the normalised form,
or null when the client cannot write that message}. It must run on any Python 3 alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable

_EOL = re.compile(rb"\r\n|\r|\n")


def _normalize(data: bytes) -> bytes:
    # Must stay identical to interop.corpus.normalize.
    return _EOL.sub(b"\n", data).rstrip(b"\n")


def offlineimap(raw: bytes) -> bytes:
    """offlineimap3: folder/IMAP.py _fetch_from_imap + folder/Maildir.py save_to_tmp_file."""
    from email import policy
    from email.errors import NoBoundaryInMultipartDefect
    from email.parser import BytesParser

    rfc = policy.default.clone(cte_type="8bit", utf8=True, refold_source="none", linesep="\r\n")
    local = policy.default.clone(cte_type="8bit", utf8=True, refold_source="none")
    msg = BytesParser(policy=rfc).parsebytes(raw)
    if any(isinstance(d, NoBoundaryInMultipartDefect) for d in msg.defects):
        from offlineimap.folder.Base import BaseFolder

        msg = BytesParser(policy=rfc).parsebytes(BaseFolder._quote_boundary_fix(None, raw))
    return msg.as_bytes(policy=local)


def getmail(raw: bytes) -> bytes:
    """getmail6: getmailcore.message.Message(...).flatten(), as its Maildir destination does."""
    from getmailcore.message import Message

    msg = Message(fromstring=raw)
    return bytes(msg.flatten(delivered_to=False, received=False))


FORMS: dict[str, Callable[[bytes], bytes]] = {"offlineimap": offlineimap, "getmail": getmail}


def main() -> None:
    mode, src = sys.argv[1], sys.argv[2]
    for extra in sys.argv[3:]:
        sys.path.insert(0, extra)  # where the client's own modules live
    out: dict[str, str | None] = {}
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as fh:
            raw = fh.read()
        try:
            form = FORMS[mode](raw)
        except Exception:
            out[name] = None
        else:
            out[name] = hashlib.sha256(_normalize(form)).hexdigest()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
