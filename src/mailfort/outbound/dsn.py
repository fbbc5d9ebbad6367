"""Delivery status notifications (RFC 3464, in an RFC 6522 multipart/report).

A bounce names each failed recipient with its status code and the remote server's answer,
and returns the original headers only (not the body): enough for the sender to see what
failed, without sending their content around again.
"""

from __future__ import annotations

import email.utils
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True)
class Failure:
    rcpt: str
    code: int
    text: str

    @property
    def status(self) -> str:
        found = _STATUS.search(self.text)
        if found:
            return found.group(1)
        return "5.0.0" if self.code >= 500 else "4.0.0"


def build(
    reporting_mta: str,
    sender: str,
    failures: Sequence[Failure],
    original: bytes,
    *,
    delayed: bool = False,
) -> bytes:
    """The DSN message for ``sender``; ``delayed`` makes it a warning, not a bounce."""
    boundary = "=_mf_" + os.urandom(12).hex()
    headers = original.split(b"\r\n\r\n", 1)[0]
    action = "delayed" if delayed else "failed"
    subject = "Delivery delayed: still trying" if delayed else "Undelivered Mail Returned to Sender"
    human = (
        "Your message has not been delivered yet to the recipients below; we keep trying "
        "for up to five days and will tell you if it fails."
        if delayed
        else "Your message could not be delivered to the recipients below."
    )
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: <{os.urandom(12).hex()}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834: no auto-replies to this
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "",
        human,
        "",
    ]
    for f in failures:
        lines.append(f"<{f.rcpt}>: {f.code} {f.text}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",  # RFC 3464 §2.2
        f"Arrival-Date: {email.utils.formatdate(localtime=False)}",
    ]
    for f in failures:
        lines += [
            "",
            f"Final-Recipient: rfc822; {f.rcpt}",  # §2.3
            f"Action: {action}",
            f"Status: {f.status}",
            f"Diagnostic-Code: smtp; {f.code} {f.text}".replace("\r", " ").replace("\n", " "),
        ]
    lines += ["", f"--{boundary}", "Content-Type: text/rfc822-headers", ""]
    text = "\r\n".join(lines).encode("utf-8", "replace") + b"\r\n"
    return text + headers + b"\r\n\r\n" + f"--{boundary}--\r\n".encode()
