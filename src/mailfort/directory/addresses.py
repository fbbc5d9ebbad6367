"""Address syntax the directory accepts, normalised once so lookups compare equal strings.

We host a deliberately narrow local-part syntax (lower-case ASCII letters, digits, ``.``,
``_`` and ``-``): it is what people type, it survives every client and gateway, and it
leaves ``+`` free for plus-addressing. Domains are stored as lower-case A-labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LOCAL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Forward targets are other people's addresses: accept RFC 5321 dot-atom local parts.
_REMOTE_LOCAL_RE = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$"
)


class AddressError(ValueError):
    """An address or domain the directory refuses; the message is shown to the operator."""


def normalise_domain(domain: str) -> str:
    name = domain.strip().rstrip(".")
    try:
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise AddressError(f"invalid domain name: {domain!r}") from exc
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL_RE.match(lb) for lb in labels):
        raise AddressError(f"invalid domain name: {domain!r}")
    if labels[-1].isdigit():
        raise AddressError(f"invalid domain name: {domain!r} (top-level label is numeric)")
    return name


@dataclass(frozen=True)
class Address:
    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def split(address: str) -> tuple[str, str]:
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"invalid address: {address!r} (expected local@domain)")
    return local, domain


def parse_local_address(address: str) -> Address:
    """An address we host (a user or alias): narrow syntax, lower-cased."""
    local, domain = split(address)
    local = local.lower()
    if not local.isascii() or not _LOCAL_RE.match(local) or ".." in local:
        raise AddressError(
            f"invalid local part in {address!r}: use a-z, 0-9, '.', '_' or '-' "
            "(not at the ends, at most 64 characters)"
        )
    return Address(local, normalise_domain(domain))


def parse_remote_address(address: str) -> Address:
    """An address elsewhere (a forward target): RFC 5321 dot-atom, case kept."""
    local, domain = split(address)
    if len(local) > 64 or not _REMOTE_LOCAL_RE.match(local):
        raise AddressError(f"invalid address: {address!r}")
    return Address(local, normalise_domain(domain))


def split_plus(local: str) -> tuple[str, str | None]:
    """``user+tag`` -> (``user``, ``tag``): the tag routes to the user's mailbox."""
    base, plus, tag = local.partition("+")
    return (base, tag) if plus else (local, None)
