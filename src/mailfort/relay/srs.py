"""Sender Rewriting Scheme: envelope senders for forwarded mail that pass SPF and bounce home.

When we forward, the envelope sender becomes an address at our SRS domain that encodes
the original sender, so the target's SPF check sees our domain and a bounce comes back to
us; ``reverse`` turns it back into the original sender, and only for addresses we made.

Formats (Shevek's scheme as libsrs2 and postsrsd write it):

    SRS0=HHHHHHHHHH=TT=orig.example=user@fwd.example          (we forward a plain sender)
    SRS1=HHHHHHHHHH=first.example==HHHH=TT=orig.example=user@fwd.example
                                                    (we forward what another forwarder made)

``TT`` is the day number modulo 1024 in two base32 characters, exactly as libsrs2 writes it
(alphabet A-Z2-7, high five bits first). In SRS1 the part after the first forwarder's host
is everything after its ``SRS0`` tag, separator included, so ``reverse`` rebuilds the
first forwarder's SRS0 address byte for byte and its own hash check still passes.

Deliberate differences from postsrsd (libsrs2) and Forward Email (the npm
``sender-rewriting-scheme`` package, configured with ``separator '='`` and ``maxAge 30``):

- The hash is HMAC-SHA256 truncated to 10 base32 characters, 50 bits; libsrs2 uses
  HMAC-SHA1 in 4 base64 characters (24 bits, and compared case-insensitively, so about 21
  bits really count). Nobody can check a guess offline without the key, so forging means
  online guessing by mailing bounces at us: at 10,000 guesses a second for the whole
  10-day life of an address an attacker's chance is 8.6e9 / 2**50, under 1e-5; with 4
  base64 characters it is a near certainty within half an hour. 50 bits costs 6 more
  characters of the 64-octet local part than libsrs2's 4.
- base32 rather than base64 for the hash: MTAs and mailing-list software change the case
  of local parts, and base64 survives that only by the lossy comparison libsrs2 does. All
  comparison is on upper-cased hashes and stamps, and the MAC input is lower-cased (ASCII
  only), so a case-changed SRS address verifies in full.
- The MAC input is length-prefixed fields, and includes the tag and our SRS domain.
  libsrs2 hashes the concatenation ``TT + host + user``, which does not fix where the host
  ends: the hash for ``x@ab.com`` also signs ``mx@ab.co``. The tag keeps an SRS0 hash from
  serving as an SRS1 hash, and the domain keeps an address valid for one SRS domain from
  verifying at another that shares a secret.
- SRS1 addresses carry no timestamp of their own in the standard format, so libsrs2 never
  expires them. We read the first forwarder's SRS0 stamp inside (our hash covers it, so it
  cannot be altered) and apply our ``max_age_days`` to it; an inner part that is not a
  standard SRS0 body is accepted on our hash alone (it dies with the secret that signed it).
- A stamp one day in the future is accepted, so nodes whose clocks straddle midnight agree;
  libsrs2 treats it as 1023 days old. A stamp of age ``max_age_days`` is still valid, so an
  address lives at least ``max_age_days`` full days (at most one day more), as in libsrs2.
- Quoted local parts are supported properly: the SRS fields hold the unquoted content,
  and an address whose local part is not a dot-atom is written quoted (RFC 5321 §4.1.2).
  libsrs2 copies the quotes into the middle of the new local part, which is not valid.
- Sender domains are stored as lower-case A-labels (IDN senders become punycode), so the
  SRS local part is ASCII whenever the original local part is.
- A sender at our own SRS domain, SRS or not, is returned unchanged (postsrsd does the
  same for local domains unless "always-rewrite"): see ``forward``.

Local-part length. RFC 5321 §4.5.3.1.1 allows 64 octets. SRS0 adds 20 octets and the
original domain to the original local part, so long senders overflow it. postsrsd's answer
is a database mode that stores the sender and puts a short key in the address; forwarding
here writes nothing to disk and a lossy in-memory map would break bounces after a restart,
so we emit the longer address, as postsrsd's default mode, libsrs2 and Forward Email do.
Postfix, Exim and the large providers accept such local parts; a target that refuses one
answers 5xx at MAIL FROM and the forwarder reports it. ``SRS.MAX_LOCAL_PART`` and
``overlong`` let the caller count or log these.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence

from mailfort.directory.addresses import AddressError, normalise_domain

__all__ = ["SRS", "SRSError", "SRSExpired"]

_HASH_CHARS = 10  # 50 bits of HMAC-SHA256; see the module docstring
_STAMP_CHARS = 2
_DAY = 86400
_STAMP_SLOTS = 1024  # two base32 characters
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_SET = frozenset(_B32)
_SEPARATORS = "=+-"
_TAG_RE = re.compile(r"^SRS([01])[=+-]", re.IGNORECASE)
_MIN_SECRET = 16
# RFC 5321 §4.1.2 atext: a local part made only of these, with single dots between
# non-empty runs, needs no quotes. Non-ASCII (RFC 6531) counts as atext too.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_ATOM_RE = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")
_LITERAL_RE = re.compile(r"^\[[A-Za-z0-9:.\-]+\]$")


class SRSError(ValueError):
    """Not an SRS address of ours, a bad hash, or an address that cannot be parsed."""


class SRSExpired(SRSError):
    """An authentic SRS address whose timestamp is older than the maximum age."""


def _quote_local(local: str) -> str:
    if _DOT_ATOM_RE.match(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> (unquoted local part, domain); the domain is not normalised."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise SRSError(f"not an address: {address!r}")
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            raise SRSError(f"unbalanced quotes in {address!r}")
        body = local[1:-1]
        out: list[str] = []
        i = 0
        while i < len(body):
            ch = body[i]
            if ch == "\\":
                if i + 1 == len(body):
                    raise SRSError(f"bad quoted local part in {address!r}")
                out.append(body[i + 1])
                i += 2
                continue
            if ch == '"':
                raise SRSError(f"bad quoted local part in {address!r}")
            out.append(ch)
            i += 1
        local = "".join(out)
        if not local:
            raise SRSError(f"empty local part in {address!r}")
    return local, domain


def _host(domain: str) -> str:
    """A sender's domain as we embed and compare it: lower-case A-labels, or a literal."""
    if _LITERAL_RE.match(domain):
        return domain.lower()
    try:
        return normalise_domain(domain)
    except AddressError as exc:
        raise SRSError(f"cannot use domain {domain!r}: {exc}") from exc


def _fold(text: str) -> bytes:
    # ASCII-only lower-casing: that is what MTAs do to local parts, and it is
    # locale-independent, unlike Unicode case folding.
    return text.encode("utf-8", "surrogatepass").lower()


def _stamp_for(day: int) -> str:
    day %= _STAMP_SLOTS
    return _B32[day >> 5] + _B32[day & 31]


def _stamp_value(stamp: str) -> int | None:
    stamp = stamp.upper()
    if len(stamp) != _STAMP_CHARS or not set(stamp) <= _B32_SET:
        return None
    return (_B32.index(stamp[0]) << 5) | _B32.index(stamp[1])


class SRS:
    """SRS0/SRS1 rewriting at one SRS domain with a list of secrets.

    ``secrets[0]`` signs; every secret in the list verifies, so rotation is passing
    ``[current, previous]`` and dropping a secret invalidates what it signed.
    """

    MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1, in octets

    def __init__(
        self,
        domain: str,
        secrets: Sequence[bytes],
        *,
        max_age_days: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            self._domain = normalise_domain(domain)
        except AddressError as exc:
            raise ValueError(f"bad SRS domain {domain!r}: {exc}") from exc
        if not secrets:
            raise ValueError("SRS needs at least one secret")
        for secret in secrets:
            if not isinstance(secret, bytes) or len(secret) < _MIN_SECRET:
                raise ValueError(f"SRS secrets must be bytes of at least {_MIN_SECRET} octets")
        # Far below 1024 days, or a stamp could not tell "recent" from "a cycle ago".
        if not 1 <= max_age_days <= 1000:
            raise ValueError("max_age_days must be between 1 and 1000")
        self._secrets = tuple(bytes(s) for s in secrets)
        self._max_age = max_age_days
        self._clock = clock

    @property
    def domain(self) -> str:
        """The SRS domain, as a lower-case A-label name."""
        return self._domain

    # -- public API ---------------------------------------------------------------------

    def forward(self, sender: str) -> str:
        """The envelope sender to use when forwarding mail from ``sender``.

        ``""`` (the null sender of bounces) stays ``""``. A sender already at our SRS
        domain is returned unchanged: an SRS address of ours already routes bounces home
        and still reverses to the original sender, re-signing it would let a forwarding
        loop keep it alive forever, and an SRS1 pointing at ourselves would only add a
        hop. (Verifying it first would change nothing: an invalid one just bounces
        nowhere, as it would have anyway.)
        """
        if sender == "":
            return ""
        local, domain = _split_address(sender)
        host = _host(domain)
        if host == self._domain:
            return sender
        tag = _TAG_RE.match(local)
        if tag and tag.group(1) == "0" and len(local) > 5:
            # Another forwarder's SRS0: keep its host and everything after "SRS0".
            return self._srs1(host, local[4:])
        if tag and tag.group(1) == "1":
            parts = local[5:].split("=", 2)
            if len(parts) == 3 and parts[1] and len(parts[2]) > 1 and parts[2][0] in _SEPARATORS:
                try:
                    first_host = _host(parts[1])
                except SRSError:
                    pass
                else:
                    # Another forwarder's SRS1: same first forwarder, re-signed at us.
                    return self._srs1(first_host, parts[2])
        # A plain sender, or something only dressed as SRS: wrap it whole, so bounces
        # still go back exactly where the sender asked.
        return self._srs0(host, local)

    def reverse(self, address: str) -> str:
        """The address a bounce to our SRS ``address`` should go to.

        SRS0 gives the original sender; SRS1 gives the first forwarder's SRS0 address.
        Raises ``SRSExpired`` for an authentic but stale address and ``SRSError`` for
        anything else that is not a valid SRS address of ours.
        """
        local, domain = _split_address(address)
        try:
            ours = _host(domain) == self._domain
        except SRSError:
            ours = False
        if not ours:
            raise SRSError(f"not an SRS address at {self._domain}: {address!r}")
        tag = _TAG_RE.match(local)
        # We only ever write "=" after our tag; anything else was not made here.
        if not tag or local[4] != "=":
            raise SRSError(f"not an SRS address of ours: {address!r}")
        if tag.group(1) == "0":
            return self._reverse0(local[5:], address)
        return self._reverse1(local[5:], address)

    @staticmethod
    def is_srs(address: str) -> bool:
        """The local part starts with SRS0 or SRS1 and a separator (``=``, ``+``, ``-``)."""
        local = address.rpartition("@")[0] if "@" in address else address
        return bool(_TAG_RE.match(local.lstrip('"')))

    @classmethod
    def overlong(cls, address: str) -> bool:
        """The local part of ``address`` exceeds RFC 5321's 64 octets."""
        local = address.rpartition("@")[0]
        return len(local.encode("utf-8", "surrogatepass")) > cls.MAX_LOCAL_PART

    # -- SRS0 ---------------------------------------------------------------------------

    def _srs0(self, host: str, user: str) -> str:
        if "=" in host:  # cannot happen for a normalised host; keeps parsing unambiguous
            raise SRSError(f"cannot encode host {host!r}")
        stamp = _stamp_for(self._today())
        digest = self._mac(self._secrets[0], b"SRS0", stamp, host, user)
        local = f"SRS0={digest}={stamp}={host}={user}"
        return f"{_quote_local(local)}@{self._domain}"

    def _reverse0(self, body: str, address: str) -> str:
        fields = body.split("=", 3)
        if len(fields) != 4 or not all(fields):
            raise SRSError(f"malformed SRS0 address: {address!r}")
        digest, stamp, host, user = fields
        then = _stamp_value(stamp)
        if then is None:
            raise SRSError(f"malformed SRS0 timestamp: {address!r}")
        self._verify(digest, address, b"SRS0", stamp.upper(), host, user)
        self._check_age(then, address)
        return f"{_quote_local(user)}@{host}"

    # -- SRS1 ---------------------------------------------------------------------------

    def _srs1(self, first_host: str, rest: str) -> str:
        if rest[0] not in _SEPARATORS or len(rest) < 2:
            raise SRSError(f"cannot wrap SRS0 remainder {rest!r}")
        digest = self._mac(self._secrets[0], b"SRS1", first_host, rest)
        local = f"SRS1={digest}={first_host}={rest}"
        return f"{_quote_local(local)}@{self._domain}"

    def _reverse1(self, body: str, address: str) -> str:
        fields = body.split("=", 2)
        if len(fields) != 3 or not all(fields):
            raise SRSError(f"malformed SRS1 address: {address!r}")
        digest, first_host, rest = fields
        if rest[0] not in _SEPARATORS or len(rest) < 2:
            raise SRSError(f"malformed SRS1 address: {address!r}")
        self._verify(digest, address, b"SRS1", first_host, rest)
        # The first forwarder's own stamp, if it wrote a standard SRS0 body.
        inner = rest[1:].split("=", 3)
        if len(inner) == 4:
            then = _stamp_value(inner[1])
            if then is not None:
                self._check_age(then, address)
        return f"{_quote_local('SRS0' + rest)}@{first_host}"

    # -- hashing and time ---------------------------------------------------------------

    def _mac(self, secret: bytes, tag: bytes, *fields: str) -> str:
        mac = hmac.new(secret, digestmod=hashlib.sha256)
        for part in (tag, _fold(self._domain), *(_fold(f) for f in fields)):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return base64.b32encode(mac.digest()).decode("ascii")[:_HASH_CHARS]

    def _verify(self, digest: str, address: str, tag: bytes, *fields: str) -> None:
        given = digest.upper().encode("ascii", "replace")
        ok = False
        # Every secret is tried (no early exit), so timing tells nothing about which.
        for secret in self._secrets:
            expected = self._mac(secret, tag, *fields).encode("ascii")
            ok |= hmac.compare_digest(given, expected)
        if not ok:
            raise SRSError(f"SRS hash does not verify: {address!r}")

    def _today(self) -> int:
        return int(self._clock() // _DAY)

    def _check_age(self, then: int, address: str) -> None:
        age = (self._today() - then) % _STAMP_SLOTS
        # age == 1023 is "tomorrow": another node's clock already past midnight.
        if age > self._max_age and age != _STAMP_SLOTS - 1:
            raise SRSExpired(f"SRS address older than {self._max_age} days: {address!r}")
