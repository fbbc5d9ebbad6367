"""Forward Email's DNS TXT forwarding syntax, for domains configured with no account data.

A domain publishes its aliases in TXT records (``forward-email=...``); comma-separated
entries may span one or several records, which are concatenated in the order given.
``parse`` reads them once into ``Rules``; ``Rules.resolve(local_part)`` answers for one
recipient. The grammar and semantics follow Forward Email's own resolver
(``helpers/get-forwarding-addresses.js`` in forwardemail/forwardemail.net) and FAQ:

    alias:user@example.org          alias forwards to an address
    alias:https://hook.example/x    alias forwards to a webhook (we allow https only)
    alias:example.net               alias forwards to the same local part at example.net
    user@example.org                catch-all: every other local part forwards there
    example.net                     catch-all to the same local part at example.net
    https://hook.example/x          catch-all webhook
    /^(support|info)$/:u+$1@x.org   regex on the local part, with $1..$99, $& and $$
    /^a.*/gi:...                    flags: only i and g; i is always on, g means nothing
    !alias  !!alias  !!!alias       accept and drop (250) / 421 / 550; ":target" is
    !/re/   !!/re/   !!!/re/        allowed and ignored, so an alias can be toggled
    /re/:!  /re/:!!  /re/:!!!       the same actions written on the regex's target side

Precedence, as Forward Email does it:
1. Entries are read in record order. The first matching entry carrying a ``!`` prefix
   decides (DROP, TEMPFAIL or REJECT), even if a forwarding entry matched before it.
2. Otherwise every matching exact-alias entry and every matching regex contributes its
   targets, in record order, duplicates removed: ``hello:a@x.org,hello:b@y.org`` forwards
   to both, and an alias and a regex that both match add up.
3. Only when no alias or regex matched do the catch-all entries apply.
4. Nothing matched: ``None`` (unknown recipient; refuse at RCPT).
Aliases are matched against the local part lower-cased and without its plus tag.

Plus tags: ``alias+tag@domain`` matches ``alias``, and each address target gets the tag,
replacing a tag it already has (``user+a@x.org`` becomes ``user+tag@x.org``), as Forward
Email does; webhook targets are unchanged. Our tag is everything after the first ``+``
(Forward Email keeps only the text up to a second ``+``). If adding the tag would make the
address invalid (over 64 octets) the target is used without it.

Deliberate differences from Forward Email:
- Regexes run on RE2 (``google-re2``): linear time, no backtracking, so a hostile or
  careless pattern such as the FAQ's own ``^([A-Za-z]+)+\\.([A-Za-z]+)+$`` costs
  microseconds, not exponential time. JavaScript features RE2 lacks (lookaround,
  backreferences) fail to compile and are reported in ``Rules.errors``.
- Substitution expands the target template only. Forward Email calls JavaScript's
  ``username.replace(regex, target)``, which keeps the unmatched parts of the local part
  around the target for an unanchored regex (``/sup/:x@y.org`` with ``$1`` somewhere
  gives ``my<target>port``); anchored patterns, the documented use, behave the same.
- Values substituted into a webhook URL are percent-encoded, so a sender choosing the
  local part cannot add query parameters or change the path. A ``!`` at the start of a
  regex target counts only when it is written in the record, never when a substituted
  value supplies it.
- Too many targets: the first 10 per alias (and for the catch-all) are kept and the rest
  reported in ``errors``; a regex adding more at resolve time is cut at 10 too. Forward
  Email answers 421 for the whole message instead.
- Plain http:// webhooks, IP address targets, and Forward Email's encrypted TXT values
  (base64 under their key) are not supported and are reported as errors.
- The ``forward-email=`` prefix is matched case-insensitively.

Bounds, so that DNS data cannot cost much: at most 16 KiB of forward-email text, 256
entries, 32 regexes of at most 256 characters each compiled with a 256 KiB RE2 memory
budget, and local parts longer than 255 characters match nothing.

``parse`` never raises on bad DNS data: each bad entry is skipped and described in
``Rules.errors``, so the operator can be told what was ignored.
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import re2  # type: ignore[import-untyped]

from mailfort.directory.addresses import AddressError, normalise_domain, parse_remote_address

__all__ = [
    "MAX_TARGETS",
    "Action",
    "Decision",
    "Rules",
    "parse",
]

PREFIX = "forward-email="
MAX_TARGETS = 10
MAX_TEXT = 16 * 1024
MAX_ENTRIES = 256
MAX_REGEXES = 32
MAX_REGEX_LENGTH = 256
MAX_URL_LENGTH = 2048
MAX_LOCAL_PART = 255
_RE2_MAX_MEM = 256 * 1024
_REGEX_FLAGS = frozenset("gi")
# A dot-atom local part without "+", which would be read as a plus tag and never match.
_ALIAS_RE = re.compile(r"^[a-z0-9!#$%&'*/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*/=?^_`{|}~-]+)*$")
_IPV4_RE = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")


class Action(enum.Enum):
    FORWARD = "forward"
    DROP = "drop"  # accept with 250 and discard
    TEMPFAIL = "tempfail"  # 421
    REJECT = "reject"  # 550


@dataclass(frozen=True)
class Decision:
    action: Action
    targets: tuple[str, ...] = ()
    """Addresses (``local@a-label.domain``) or https:// URLs, after $n and plus tags."""


_BANGS = {1: Action.DROP, 2: Action.TEMPFAIL, 3: Action.REJECT}


class _Kind(enum.Enum):
    ADDRESS = "address"
    DOMAIN = "domain"  # forward to the recipient's own local part at this domain
    URL = "url"


@dataclass(frozen=True)
class _Target:
    kind: _Kind
    value: str


@dataclass(frozen=True)
class _Alias:
    name: str
    action: Action
    targets: tuple[_Target, ...]


@dataclass(frozen=True)
class _Regex:
    source: str
    regex: Any  # re2._Regexp; the binding has no type information
    action: Action
    template: str


_Entry = _Alias | _Regex


class Rules:
    """The forwarding rules of one domain, ready to answer for any local part."""

    def __init__(
        self,
        entries: Sequence[_Entry],
        catch_all: Sequence[_Target],
        errors: Sequence[str],
        *,
        configured: bool,
    ) -> None:
        self._entries = tuple(entries)
        self._catch_all = tuple(catch_all)
        self.errors: tuple[str, ...] = tuple(errors)
        self.configured = configured
        """At least one ``forward-email=`` record was present (valid or not)."""

    def resolve(self, local_part: str) -> Decision | None:
        """What to do with mail for ``local_part``; ``None`` if no rule covers it."""
        local = local_part.strip()
        if not local or len(local) > MAX_LOCAL_PART:
            return None
        base, plus, tag = local.partition("+")
        base = base.lower()  # the tag keeps its case: it is the sender's to choose
        if not base:
            return None
        matched = False
        found: list[_Target] = []
        for entry in self._entries:
            if isinstance(entry, _Alias):
                if entry.name != base:
                    continue
                if entry.action is not Action.FORWARD:
                    return Decision(entry.action)
                matched = True
                found.extend(entry.targets)
                continue
            match = entry.regex.search(base)
            if match is None:
                continue
            if entry.action is not Action.FORWARD:
                return Decision(entry.action)
            matched = True
            target = _substituted_target(entry.template, match)
            if target is not None:
                found.append(target)
        if not matched:
            if not self._catch_all:
                return None
            found = list(self._catch_all)
        targets: list[str] = []
        for target in found:
            final = _finish(target, base, tag if plus and tag else None)
            if final is not None and final not in targets:
                targets.append(final)
        if not targets:
            # A rule matched but produced nothing deliverable (a bad $n substitution).
            return Decision(Action.REJECT)
        return Decision(Action.FORWARD, tuple(targets[:MAX_TARGETS]))


def parse(txt_records: Sequence[str]) -> Rules:
    """Read a domain's TXT strings (each record's strings already joined)."""
    errors: list[str] = []
    values: list[str] = []
    for record in txt_records:
        text = record.strip()
        if text[: len(PREFIX)].lower() == PREFIX:
            values.append(text[len(PREFIX) :])
    configured = bool(values)
    joined = ",".join(values)
    if len(joined) > MAX_TEXT:
        cut = joined.rfind(",", 0, MAX_TEXT)
        joined = joined[: max(cut, 0)]
        errors.append(f"forward-email records exceed {MAX_TEXT} characters; the rest is ignored")
    raw_entries, split_errors = _split_entries(joined)
    errors.extend(split_errors)
    if len(raw_entries) > MAX_ENTRIES:
        errors.append(f"more than {MAX_ENTRIES} entries; the rest are ignored")
        raw_entries = raw_entries[:MAX_ENTRIES]

    entries: list[_Entry] = []
    catch_all: list[_Target] = []
    per_alias: dict[str, int] = {}
    regexes = 0
    seen: set[str] = set()
    for raw in raw_entries:
        if raw in seen:
            continue
        seen.add(raw)
        try:
            bangs, body = _bangs(raw)
            if body.startswith("/"):
                regexes += 1
                if regexes > MAX_REGEXES:
                    raise _EntryError(f"more than {MAX_REGEXES} regular expressions")
                entries.append(_parse_regex(body, bangs))
            elif body.lower().startswith(("https://", "http://")) and not bangs:
                _add_capped(catch_all, _parse_target(body), "the catch-all")
            elif ":" in body or bangs:
                alias = _parse_alias(body, bangs)
                if alias.action is Action.FORWARD:
                    count = per_alias.get(alias.name, 0)
                    if count >= MAX_TARGETS:
                        raise _EntryError(
                            f"alias {alias.name!r} has more than {MAX_TARGETS} targets"
                        )
                    per_alias[alias.name] = count + 1
                entries.append(alias)
            else:
                _add_capped(catch_all, _parse_target(body), "the catch-all")
        except _EntryError as exc:
            errors.append(f"{_show(raw)}: {exc}")
    return Rules(entries, catch_all, errors, configured=configured)


# -- parsing helpers ----------------------------------------------------------------------


class _EntryError(ValueError):
    pass


def _show(raw: str) -> str:
    return repr(raw if len(raw) <= 80 else raw[:77] + "...")


def _add_capped(targets: list[_Target], target: _Target, what: str) -> None:
    if target in targets:
        return
    if len(targets) >= MAX_TARGETS:
        raise _EntryError(f"{what} has more than {MAX_TARGETS} targets")
    targets.append(target)


def _split_entries(text: str) -> tuple[list[str], list[str]]:
    """Comma-separated entries, where a regex literal may itself contain commas.

    A regex is lexed as a JavaScript literal (see ``_regex_end``); its target after ``:``
    runs to the next comma, as every other entry does. A regex that does not end
    properly is reported and skipped up to the next comma, so it cannot swallow the
    entries after it.
    """
    entries: list[str] = []
    errors: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in ", \t\r\n":
            i += 1
            continue
        start = i
        j = i
        while j < n and text[j] == "!":
            j += 1
        end = text.find(",", start)
        end = n if end < 0 else end
        if j < n and text[j] == "/":
            close = _regex_end(text, j)
            if close is None:
                errors.append(f"{_show(text[start:end])}: unterminated regular expression")
                i = end + 1
                continue
            end = text.find(",", close + 1)
            end = n if end < 0 else end
        entry = text[start:end].strip()
        if entry:
            entries.append(entry)
        i = end + 1
    return entries, errors


_AFTER_REGEX = re.compile(r"[A-Za-z]*\s*(?::|,|$)")


def _regex_end(text: str, opening: int) -> int | None:
    """Index of the ``/`` closing the regex literal opened at ``opening``, or None.

    Escapes, and ``/`` inside ``[...]``, do not close it (JavaScript's rule), and the
    close must be followed by flags and then ``:``, ``,`` or the end.
    """
    k = opening + 1
    in_class = False
    n = len(text)
    while k < n:
        ch = text[k]
        if ch == "\\":
            k += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "/":
            return k if _AFTER_REGEX.match(text, k + 1) else None
        k += 1
    return None


def _bangs(raw: str) -> tuple[int, str]:
    count = len(raw) - len(raw.lstrip("!"))
    if count > 3:
        raise _EntryError("more than three '!'")
    return count, raw[count:].strip()


def _parse_regex(body: str, bangs: int) -> _Regex:
    k = _regex_end(body, 0)
    if k is None:
        raise _EntryError("unterminated regular expression")
    pattern = body[1:k]
    rest = body[k + 1 :]
    flags = ""
    while rest and rest[0].isalpha():
        flags += rest[0]
        rest = rest[1:]
    rest = rest.lstrip()
    if not set(flags) <= _REGEX_FLAGS:
        raise _EntryError(f"unsupported regex flags {flags!r} (only i and g)")
    if not pattern:
        raise _EntryError("empty regular expression")
    if len(pattern) > MAX_REGEX_LENGTH:
        raise _EntryError(f"regular expression longer than {MAX_REGEX_LENGTH} characters")
    template = ""
    if rest.startswith(":"):
        template = rest[1:].strip()
    elif rest.strip():
        raise _EntryError("expected ':' and a target after the regular expression")
    action = _BANGS.get(bangs, Action.FORWARD)
    if action is Action.FORWARD:
        target_bangs = len(template) - len(template.lstrip("!"))
        if target_bangs > 3:
            raise _EntryError("more than three '!'")
        if target_bangs:
            action = _BANGS[target_bangs]
        elif not template:
            raise _EntryError("regular expression without a target")
        else:
            _check_template(template)
    options = re2.Options()
    options.case_sensitive = False  # local parts compare case-insensitively, as at FE
    options.log_errors = False
    options.max_mem = _RE2_MAX_MEM
    try:
        regex = re2.compile(pattern, options)
    except re2.error as exc:
        message = exc.args[0] if exc.args else exc
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        raise _EntryError(f"invalid regular expression: {message}") from None
    return _Regex(source=pattern, regex=regex, action=action, template=template)


def _check_template(template: str) -> None:
    """Reject templates that cannot give a valid target whatever $n turn out to be."""
    probe = re.sub(r"\$(\d{1,2}|&)", "x", template).replace("$$", "$")
    _parse_target(probe)


def _parse_alias(body: str, bangs: int) -> _Alias:
    name, colon, target_text = body.partition(":")
    name = name.strip().lower()
    if not name or len(name) > 64 or not _ALIAS_RE.match(name):
        raise _EntryError(f"invalid alias {name!r}")
    action = _BANGS.get(bangs, Action.FORWARD)
    if action is not Action.FORWARD:
        # The target is kept in the record only to toggle the alias back on later.
        return _Alias(name, action, ())
    if not colon or not target_text.strip():
        raise _EntryError("alias without a target")
    return _Alias(name, action, (_parse_target(target_text.strip()),))


def _parse_target(text: str) -> _Target:
    lowered = text.lower()
    if lowered.startswith("http://"):
        raise _EntryError("webhook targets must use https://")
    if lowered.startswith("https://"):
        return _Target(_Kind.URL, _check_url(text))
    if "@" in text:
        try:
            return _Target(_Kind.ADDRESS, str(parse_remote_address(text)))
        except AddressError as exc:
            raise _EntryError(str(exc)) from None
    if _IPV4_RE.match(text) or ":" in text:
        raise _EntryError("IP address targets are not supported")
    try:
        return _Target(_Kind.DOMAIN, normalise_domain(text))
    except AddressError:
        raise _EntryError("not an address, a domain or an https:// URL") from None


def _check_url(text: str) -> str:
    if len(text) > MAX_URL_LENGTH or any(ch.isspace() or ord(ch) < 0x20 for ch in text):
        raise _EntryError("invalid webhook URL")
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() != "https" or not parts.hostname or parts.username is not None:
        raise _EntryError("invalid webhook URL")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise _EntryError("invalid webhook URL") from None
    return text


# -- resolving helpers --------------------------------------------------------------------


def _expand(template: str, match: Any, *, quote: bool) -> str:
    """JavaScript replacement patterns: $1..$99, $& and $$; anything else is literal."""
    groups: int = match.re.groups

    def value(n: int) -> str:
        got = match.group(n)
        text = got if isinstance(got, str) else ""
        return urllib.parse.quote(text, safe="") if quote else text

    out: list[str] = []
    i, n = 0, len(template)
    while i < n:
        ch = template[i]
        if ch == "$" and i + 1 < n:
            nxt = template[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "&":
                out.append(value(0))
                i += 2
                continue
            if nxt.isdigit():
                # Two digits when that group exists, as JavaScript decides.
                if (
                    i + 2 < n
                    and template[i + 2].isdigit()
                    and 0 < int(template[i + 1 : i + 3]) <= groups
                ):
                    out.append(value(int(template[i + 1 : i + 3])))
                    i += 3
                    continue
                if 0 < int(nxt) <= groups:
                    out.append(value(int(nxt)))
                    i += 2
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


def _substituted_target(template: str, match: Any) -> _Target | None:
    is_url = template.lower().startswith("https://")
    try:
        return _parse_target(_expand(template, match, quote=is_url))
    except _EntryError:
        return None


def _finish(target: _Target, base: str, tag: str | None) -> str | None:
    """The target as delivered to: a domain gets the local part, an address the tag."""
    if target.kind is _Kind.URL:
        return target.value
    if target.kind is _Kind.DOMAIN:
        address = f"{base}@{target.value}"
        try:
            parse_remote_address(address)
        except AddressError:
            return None
    else:
        address = target.value
    if tag is None:
        return address
    local, _, domain = address.rpartition("@")
    tagged = f"{local.partition('+')[0]}+{tag}@{domain}"
    try:
        return str(parse_remote_address(tagged))
    except AddressError:
        return address
