"""Storage quota (RFC 9208 STORAGE and MESSAGE resources): one limit over a whole mailbox.

The limits are the operator's (``MAILFORT_QUOTA_BYTES`` / ``MAILFORT_QUOTA_MESSAGES``, 0 for
none); every write that adds mail checks them inside its own transaction, so concurrent
deliveries cannot overshoot together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

#: 10 GiB and a million messages unless the operator says otherwise.
DEFAULT_QUOTA_BYTES = 10 * 1024**3
DEFAULT_QUOTA_MESSAGES = 1_000_000


class QuotaExceeded(Exception):
    """Filing the message(s) would take the mailbox past a quota limit.

    ``resource`` is ``"STORAGE"`` (octets) or ``"MESSAGE"`` (count), as RFC 9208 names
    them; ``limit`` the limit, ``used`` the usage before, ``adding`` what was refused.
    """

    def __init__(self, resource: str, limit: int, used: int, adding: int) -> None:
        self.resource = resource
        self.limit = limit
        self.used = used
        self.adding = adding
        unit = "octets" if resource == "STORAGE" else "messages"
        super().__init__(
            f"mailbox full: {used} of {limit} {unit} used, {adding} more would not fit"
        )


def _env_limit(env: Mapping[str, str], name: str, default: int) -> int | None:
    value = env.get(name, "").strip()
    try:
        number = int(value) if value else default
    except ValueError as exc:
        raise ValueError(f"{name} must be a whole number (0: no limit), not {value!r}") from exc
    if number < 0:
        raise ValueError(f"{name} must not be negative")
    return number or None


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits for one mailbox; None means no limit on that resource."""

    storage: int | None = DEFAULT_QUOTA_BYTES
    messages: int | None = DEFAULT_QUOTA_MESSAGES

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Quota:
        return cls(
            _env_limit(env, "MAILFORT_QUOTA_BYTES", DEFAULT_QUOTA_BYTES),
            _env_limit(env, "MAILFORT_QUOTA_MESSAGES", DEFAULT_QUOTA_MESSAGES),
        )

    @property
    def limited(self) -> bool:
        return self.storage is not None or self.messages is not None

    def check(self, used_octets: int, used_messages: int, octets: int, messages: int) -> None:
        """Raise :class:`QuotaExceeded` if adding ``messages`` of ``octets`` overflows."""
        if self.storage is not None and used_octets + octets > self.storage:
            raise QuotaExceeded("STORAGE", self.storage, used_octets, octets)
        if self.messages is not None and used_messages + messages > self.messages:
            raise QuotaExceeded("MESSAGE", self.messages, used_messages, messages)


#: No limit at all (draining a spool, restoring a backup).
UNLIMITED = Quota(None, None)
