"""Strength rules for passwords that people choose (generated ones need none)."""

from __future__ import annotations

_COMMON = frozenset(
    {
        "password",
        "password1",
        "123456789012",
        "qwertyuiopas",
        "letmeinplease",
        "iloveyou1234",
        "administrator",
        "passw0rd1234",
        "welcome12345",
        "changeme1234",
    }
)
MIN_LENGTH = 12


class WeakPassword(ValueError):
    """The message says what to change."""


def check_password_strength(password: str, local_part: str = "") -> None:
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"password too short: use at least {MIN_LENGTH} characters")
    if len(password) > 1024:
        raise WeakPassword("password too long: at most 1024 characters")
    lowered = password.lower()
    if lowered in _COMMON or len(set(password)) < 5:
        raise WeakPassword("password too easy to guess: choose a less common one")
    if local_part and len(local_part) >= 3 and local_part in lowered:
        raise WeakPassword("password must not contain the account name")
