"""Per-user sending limits: messages and recipients per hour and per day.

A stolen app password should not turn an account into a spam cannon. Moving windows from
the `limits` library (memory by default; the same API runs on Redis for several nodes).
"""

from __future__ import annotations

from dataclasses import dataclass

from limits import RateLimitItemPerDay, RateLimitItemPerHour
from limits.storage import MemoryStorage, Storage
from limits.strategies import MovingWindowRateLimiter


@dataclass(frozen=True)
class SendingPolicy:
    messages_per_hour: int = 200
    messages_per_day: int = 1000
    recipients_per_hour: int = 500
    recipients_per_day: int = 2000


class SendingLimits:
    def __init__(self, policy: SendingPolicy | None = None, storage: Storage | None = None) -> None:
        self.policy = policy or SendingPolicy()
        self._limiter = MovingWindowRateLimiter(storage or MemoryStorage())
        p = self.policy
        self._messages = (
            RateLimitItemPerHour(p.messages_per_hour),
            RateLimitItemPerDay(p.messages_per_day),
        )
        self._recipients = (
            RateLimitItemPerHour(p.recipients_per_hour),
            RateLimitItemPerDay(p.recipients_per_day),
        )

    def _take(
        self, items: tuple[RateLimitItemPerHour, RateLimitItemPerDay], who: str, what: str
    ) -> str | None:
        # Test every window first, so a refusal does not use up the others.
        if not all(self._limiter.test(item, what, who) for item in items):
            return f"450 4.7.1 Sending limit reached ({what} per hour or day); try later"
        for item in items:
            self._limiter.hit(item, what, who)
        return None

    def message(self, user: str) -> str | None:
        """None when allowed, else the SMTP reply refusing it."""
        return self._take(self._messages, user, "messages")

    def recipient(self, user: str) -> str | None:
        return self._take(self._recipients, user, "recipients")
