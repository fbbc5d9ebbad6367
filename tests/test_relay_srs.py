"""SRS: round trips, rotation, expiry and wrap-around on an injected clock, tampering,
case changes, SRS1 chains across forwarders, libsrs2-format interop, odd local parts."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mailfort.relay.srs import SRS, SRSError, SRSExpired

DAY = 86400.0
KEY_A = b"A" * 32
KEY_B = b"B" * 32
KEY_C = b"C" * 32


class Clock:
    def __init__(self, day: int = 20000, second: float = 3600.0) -> None:
        self.now = day * DAY + second

    def __call__(self) -> float:
        return self.now

    def advance(self, days: float) -> None:
        self.now += days * DAY


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def srs(clock: Clock) -> SRS:
    return SRS("fwd.example", [KEY_A], clock=clock)


def local_of(address: str) -> str:
    return address.rpartition("@")[0]


# -- the basic shapes ---------------------------------------------------------------------


def test_srs0_shape_and_round_trip(srs: SRS) -> None:
    rewritten = srs.forward("alice@example.org")
    local, _, domain = rewritten.rpartition("@")
    assert domain == "fwd.example"
    tag, digest, stamp, host, user = local.split("=")
    assert (tag, host, user) == ("SRS0", "example.org", "alice")
    assert len(digest) == 10 and set(digest) <= set(string.ascii_uppercase + "234567")
    assert len(stamp) == 2
    assert srs.reverse(rewritten) == "alice@example.org"


def test_stamp_is_libsrs2_day_encoding() -> None:
    # Day 20000 mod 1024 = 544 = 17 * 32 + 0 -> "R" "A" in the A-Z2-7 alphabet.
    srs = SRS("fwd.example", [KEY_A], clock=Clock(day=20000))
    assert srs.forward("a@example.org").split("=")[2] == "RA"


def test_null_sender_stays_null(srs: SRS) -> None:
    assert srs.forward("") == ""


def test_local_parts_with_separators_survive(srs: SRS) -> None:
    for sender in ["a=b@example.org", "a+tag@example.org", "x=y=z+w-v@example.org", "=@x.org"]:
        assert srs.reverse(srs.forward(sender)) == sender


def test_quoted_local_part_is_quoted_in_srs(srs: SRS) -> None:
    rewritten = srs.forward('"john doe"@example.org')
    assert rewritten.startswith('"SRS0=') and rewritten.endswith('john doe"@fwd.example')
    assert srs.reverse(rewritten) == '"john doe"@example.org'
    odd = '"a\\"b@c\\\\d"@example.org'
    assert srs.reverse(srs.forward(odd)) == odd
    # A needlessly quoted dot-atom comes back in its plain, equivalent form.
    assert srs.reverse(srs.forward('"plain"@example.org')) == "plain@example.org"


def test_idn_sender_domain_becomes_a_label(srs: SRS) -> None:
    rewritten = srs.forward("jörg@bücher.de")
    assert "=xn--bcher-kva.de=jörg@" in rewritten
    assert srs.reverse(rewritten) == "jörg@xn--bcher-kva.de"


def test_idn_srs_domain(clock: Clock) -> None:
    srs = SRS("weiterleitung.bücher.de", [KEY_A], clock=clock)
    assert srs.domain == "weiterleitung.xn--bcher-kva.de"
    rewritten = srs.forward("a@example.org")
    assert rewritten.endswith("@weiterleitung.xn--bcher-kva.de")
    unicode_form = local_of(rewritten) + "@weiterleitung.bücher.de"
    assert srs.reverse(unicode_form) == "a@example.org"


def test_address_literal_sender(srs: SRS) -> None:
    rewritten = srs.forward("root@[192.0.2.1]")
    assert srs.reverse(rewritten) == "root@[192.0.2.1]"


def test_long_address_is_emitted_and_reverses(srs: SRS) -> None:
    sender = "a" * 60 + "@" + "sub." * 10 + "example.org"
    rewritten = srs.forward(sender)
    assert SRS.overlong(rewritten)
    assert not SRS.overlong(srs.forward("bob@example.org"))
    assert srs.reverse(rewritten) == sender


def test_unparseable_senders_raise(srs: SRS) -> None:
    for sender in [
        "no-at-sign",
        "@example.org",
        "user@",
        '"unterminated@example.org',
        "a@-bad-.org",
    ]:
        with pytest.raises(SRSError):
            srs.forward(sender)


def test_constructor_validation(clock: Clock) -> None:
    with pytest.raises(ValueError):
        SRS("fwd.example", [])
    with pytest.raises(ValueError):
        SRS("fwd.example", [b"short"])
    with pytest.raises(ValueError):
        SRS("not a domain", [KEY_A])
    with pytest.raises(ValueError):
        SRS("fwd.example", [KEY_A], max_age_days=0)
    with pytest.raises(ValueError):
        SRS("fwd.example", [KEY_A], max_age_days=1024)


# -- our own senders ------------------------------------------------------------------------


def test_senders_at_our_domain_are_unchanged(srs: SRS) -> None:
    ours = srs.forward("alice@example.org")
    assert srs.forward(ours) == ours
    assert srs.forward(ours.upper()) == ours.upper()
    assert srs.forward("postmaster@fwd.example") == "postmaster@fwd.example"
    first = SRS("first.example", [KEY_B], clock=srs._clock).forward("bob@example.org")
    srs1 = srs.forward(first)
    assert srs.forward(srs1) == srs1


# -- rotation -------------------------------------------------------------------------------


def test_rotation_old_secret_verifies_removed_fails(clock: Clock) -> None:
    old = SRS("fwd.example", [KEY_A], clock=clock)
    rewritten = old.forward("alice@example.org")
    rotated = SRS("fwd.example", [KEY_B, KEY_A], clock=clock)
    assert rotated.reverse(rewritten) == "alice@example.org"
    # New addresses are signed with the first secret only.
    fresh = rotated.forward("alice@example.org")
    assert fresh != rewritten
    assert SRS("fwd.example", [KEY_B], clock=clock).reverse(fresh) == "alice@example.org"
    with pytest.raises(SRSError):
        old.reverse(fresh)
    dropped = SRS("fwd.example", [KEY_C, KEY_B], clock=clock)
    with pytest.raises(SRSError) as info:
        dropped.reverse(rewritten)
    assert not isinstance(info.value, SRSExpired)


def test_other_srs_domain_does_not_verify(clock: Clock) -> None:
    """Same secret, another SRS domain: the domain is bound into the hash."""
    here = SRS("fwd.example", [KEY_A], clock=clock).forward("a@example.org")
    there = SRS("other.example", [KEY_A], clock=clock)
    with pytest.raises(SRSError):
        there.reverse(local_of(here) + "@other.example")


# -- expiry ---------------------------------------------------------------------------------


def test_expiry_at_ten_days(clock: Clock, srs: SRS) -> None:
    rewritten = srs.forward("alice@example.org")
    clock.advance(10)
    assert srs.reverse(rewritten) == "alice@example.org"
    clock.advance(0.9)  # still day +10: at least ten full days, as libsrs2
    assert srs.reverse(rewritten) == "alice@example.org"
    clock.advance(0.1)
    with pytest.raises(SRSExpired):
        srs.reverse(rewritten)


def test_issued_just_before_midnight_lives_ten_full_days() -> None:
    clock = Clock(second=DAY - 1)
    srs = SRS("fwd.example", [KEY_A], clock=clock)
    rewritten = srs.forward("alice@example.org")
    clock.advance(10)
    assert srs.reverse(rewritten) == "alice@example.org"
    clock.advance(1 / DAY)  # one second later it is day +11
    with pytest.raises(SRSExpired):
        srs.reverse(rewritten)


def test_custom_max_age(clock: Clock) -> None:
    srs = SRS("fwd.example", [KEY_A], clock=clock, max_age_days=2)
    rewritten = srs.forward("a@example.org")
    clock.advance(2)
    assert srs.reverse(rewritten) == "a@example.org"
    clock.advance(1)
    with pytest.raises(SRSExpired):
        srs.reverse(rewritten)


@pytest.mark.parametrize("issued_day", [1023, 2047, 20479])  # each the last day of a cycle
def test_timestamp_wraps_around_1024_days(issued_day: int) -> None:
    clock = Clock(day=issued_day)
    srs = SRS("fwd.example", [KEY_A], clock=clock)
    rewritten = srs.forward("a@example.org")
    assert rewritten.split("=")[2] == "77"  # 1023: the last stamp value
    clock.advance(5)  # now stamp 4 in the next cycle
    assert srs.reverse(rewritten) == "a@example.org"
    clock.advance(6)
    with pytest.raises(SRSExpired):
        srs.reverse(rewritten)


def test_stamp_a_day_ahead_is_clock_skew_two_days_is_not() -> None:
    ahead = Clock(day=30000)
    behind = Clock(day=29999)
    issued = SRS("fwd.example", [KEY_A], clock=ahead).forward("a@example.org")
    assert SRS("fwd.example", [KEY_A], clock=behind).reverse(issued) == "a@example.org"
    far = SRS("fwd.example", [KEY_A], clock=Clock(day=30002)).forward("a@example.org")
    with pytest.raises(SRSExpired):
        SRS("fwd.example", [KEY_A], clock=behind).reverse(far)


# -- tampering and case ---------------------------------------------------------------------

_ALPHABET = string.ascii_letters + string.digits + "=.+-_"


def _variants(ch: str) -> list[str]:
    """Replacements for ``ch`` that are different even ignoring case."""
    return [c for c in "=Q7.x-" if c.lower() != ch.lower()][:3]


def test_tampering_any_character_fails(srs: SRS) -> None:
    rewritten = srs.forward("alice.smith=x@example.org")
    local, _, domain = rewritten.rpartition("@")
    for i, ch in enumerate(local):
        for replacement in _variants(ch):
            forged = local[:i] + replacement + local[i + 1 :] + "@" + domain
            with pytest.raises(SRSError):
                srs.reverse(forged)
        deleted = local[:i] + local[i + 1 :] + "@" + domain
        with pytest.raises(SRSError):
            srs.reverse(deleted)
        inserted = local[:i] + "z" + local[i:] + "@" + domain
        with pytest.raises(SRSError):
            srs.reverse(inserted)


def test_tampered_srs1_fails(srs: SRS) -> None:
    first = SRS("first.example", [KEY_B], clock=srs._clock).forward("bob@example.org")
    rewritten = srs.forward(first)
    local, _, domain = rewritten.rpartition("@")
    for i, ch in enumerate(local):
        for replacement in _variants(ch):
            with pytest.raises(SRSError):
                srs.reverse(local[:i] + replacement + local[i + 1 :] + "@" + domain)


def test_field_boundaries_are_bound() -> None:
    """libsrs2 hashes host+user concatenated; moving a character across the boundary
    must not keep a valid hash here."""
    srs = SRS("fwd.example", [KEY_A], clock=Clock())
    rewritten = srs.forward("x@ab.com")
    moved = rewritten.replace("=ab.com=x@", "=ab.co=mx@")
    with pytest.raises(SRSError):
        srs.reverse(moved)


def test_other_separators_after_our_tag_are_not_ours(srs: SRS) -> None:
    rewritten = srs.forward("a@example.org")
    for sep in "+-":
        with pytest.raises(SRSError):
            srs.reverse("SRS0" + sep + rewritten[5:])


def test_case_changed_srs_verifies(srs: SRS) -> None:
    rewritten = srs.forward("Alice@Example.org")
    assert srs.reverse(rewritten.lower()).lower() == "alice@example.org"
    assert srs.reverse(rewritten.upper()).lower() == "alice@example.org"
    swapped = rewritten.swapcase()
    assert srs.reverse(swapped).lower() == "alice@example.org"


def test_case_changed_srs1_verifies(srs: SRS) -> None:
    first = SRS("first.example", [KEY_B], clock=srs._clock).forward("bob@example.org")
    rewritten = srs.forward(first)
    assert srs.reverse(rewritten.lower()).lower() == first.lower()


@pytest.mark.parametrize(
    "address",
    [
        "alice@fwd.example",
        "SRS0@fwd.example",
        "SRS0=@fwd.example",
        "SRS0=ABCDEFGHIJ@fwd.example",
        "SRS0=ABCDEFGHIJ=AA=example.org@fwd.example",
        "SRS0=ABCDEFGHIJ=A!=example.org=u@fwd.example",
        "SRS0==AA=example.org=u@fwd.example",
        "SRS1=ABCDEFGHIJ=first.example@fwd.example",
        "SRS1=ABCDEFGHIJ=first.example=x@fwd.example",
        "SRS1=ABCDEFGHIJ=first.example==@fwd.example",
        "SRS2=ABCDEFGHIJ=AA=example.org=u@fwd.example",
        "not an address",
        '"SRS0=unterminated@fwd.example',
    ],
)
def test_malformed_reverse_raises(srs: SRS, address: str) -> None:
    with pytest.raises(SRSError):
        srs.reverse(address)


def test_reverse_refuses_other_domains(srs: SRS) -> None:
    rewritten = srs.forward("a@example.org")
    with pytest.raises(SRSError):
        srs.reverse(local_of(rewritten) + "@elsewhere.example")


# -- SRS1 -----------------------------------------------------------------------------------


def test_srs1_chain_across_two_forwarders_back_to_the_original(clock: Clock) -> None:
    a = SRS("a.example", [KEY_A], clock=clock)
    b = SRS("b.example", [KEY_B], clock=clock)
    c = SRS("c.example", [KEY_C], clock=clock)
    at_a = a.forward("orig@example.org")
    at_b = b.forward(at_a)
    assert at_b.startswith("SRS1=") and "=a.example==" in at_b and at_b.endswith("@b.example")
    at_c = c.forward(at_b)
    assert at_c.startswith("SRS1=") and "=a.example==" in at_c and at_c.endswith("@c.example")
    # The bounce path skips b: c sends it straight to a, which unwraps its own SRS0.
    assert c.reverse(at_c) == at_a
    assert b.reverse(at_b) == at_a
    assert a.reverse(at_a) == "orig@example.org"


def test_srs1_of_libsrs2_style_srs0_rebuilds_it_exactly(srs: SRS) -> None:
    # "RA" is a live stamp on the fixture's day; a foreign hash is never checked here.
    for first in [
        "SRS0=HHhH=RA=orig.example=user@first.example",
        "SRS0+xY9_=RA=orig.example=us=er@first.example",
        "srs0-abcd=RA=orig.example=user@First.Example",
    ]:
        rewritten = srs.forward(first)
        assert rewritten.startswith("SRS1=")
        back = srs.reverse(rewritten)
        assert back.rpartition("@")[0] == "SRS0" + first.rpartition("@")[0][4:]
        assert back.rpartition("@")[2] == first.rpartition("@")[2].lower()


def test_srs1_from_another_forwarder_is_repointed(srs: SRS) -> None:
    other = "SRS1=ZZZZ=first.example==HHHH=RA=orig.example=user@second.example"
    rewritten = srs.forward(other)
    assert rewritten.startswith("SRS1=")
    assert rewritten.endswith("=first.example==HHHH=RA=orig.example=user@fwd.example")
    assert srs.reverse(rewritten) == "SRS0=HHHH=RA=orig.example=user@first.example"


def test_malformed_srs_from_others_is_wrapped_whole(srs: SRS) -> None:
    for sender in ["SRS0=@x.example", "SRS1=abc@x.example", "SRS1=h=x.example=nosep@x.example"]:
        rewritten = srs.forward(sender)
        assert rewritten.startswith(("SRS0=", '"SRS0='))
        assert srs.reverse(rewritten) == sender


def test_srs1_expires_with_the_inner_stamp(clock: Clock) -> None:
    first = SRS("first.example", [KEY_B], clock=clock).forward("bob@example.org")
    srs = SRS("fwd.example", [KEY_A], clock=clock)
    rewritten = srs.forward(first)
    clock.advance(10)
    assert srs.reverse(rewritten) == first
    clock.advance(1)
    with pytest.raises(SRSExpired):
        srs.reverse(rewritten)


def test_srs1_with_non_standard_inner_body_relies_on_the_hash(clock: Clock) -> None:
    srs = SRS("fwd.example", [KEY_A], clock=clock)
    rewritten = srs.forward("SRS0=opaque-token@first.example")
    clock.advance(500)
    assert srs.reverse(rewritten) == "SRS0=opaque-token@first.example"
    with pytest.raises(SRSError):
        SRS("fwd.example", [KEY_B], clock=clock).reverse(rewritten)


# -- is_srs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("SRS0=h=TT=d=u@x.example", True),
        ("srs0=h=TT=d=u@x.example", True),
        ("SRS0+h=TT=d=u@x.example", True),
        ("SRS0-h=TT=d=u@x.example", True),
        ("SRS1=h=d==h=TT=d=u@x.example", True),
        ('"SRS0=h=TT=d=john doe"@x.example', True),
        ("SRS0=h", True),
        ("srs@x.example", False),
        ("SRS0@x.example", False),
        ("SRS2=h=TT=d=u@x.example", False),
        ("SRS0_h@x.example", False),
        ("alice@SRS0=x.example", False),
        ("", False),
    ],
)
def test_is_srs(address: str, expected: bool) -> None:
    assert SRS.is_srs(address) is expected


# -- properties -----------------------------------------------------------------------------

DOT_ATOM_CHARS = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
atoms = st.text(DOT_ATOM_CHARS, min_size=1, max_size=12)
dot_atoms = st.lists(atoms, min_size=1, max_size=4).map(".".join)
quoted = st.text(string.printable.replace("\x0b", "").replace("\x0c", ""), min_size=1, max_size=20)
labels = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=10)
domains = st.lists(labels, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "example"]))


DOT_ATOM_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def _canonical(local: str, domain: str) -> str:
    """RFC 5321 §4.1.2: the same mailbox, quoted only when it is not a dot-atom."""
    if DOT_ATOM_RE.match(local):
        return f"{local}@{domain}"
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"@{domain}'


@settings(max_examples=300, deadline=None)
@given(local=dot_atoms, domain=domains, day=st.integers(0, 100000))
def test_round_trip_dot_atom(local: str, domain: str, day: int) -> None:
    assume(not SRS.is_srs(local + "@x"))
    srs = SRS("fwd.example", [KEY_A], clock=Clock(day=day))
    sender = f"{local}@{domain}"
    assert srs.reverse(srs.forward(sender)) == sender


@settings(max_examples=300, deadline=None)
@given(content=quoted, domain=domains)
def test_round_trip_quoted(content: str, domain: str) -> None:
    assume(not SRS.is_srs(content))
    srs = SRS("fwd.example", [KEY_A], clock=Clock())
    escaped = content.replace("\\", "\\\\").replace('"', '\\"')
    sender = f'"{escaped}"@{domain}'
    rewritten = srs.forward(sender)
    assert srs.reverse(rewritten) == _canonical(content, domain)
    assert srs.reverse(rewritten.upper()).lower() == _canonical(content, domain).lower()


@settings(max_examples=150, deadline=None)
@given(local=dot_atoms, domain=domains, hops=st.integers(1, 4))
def test_round_trip_through_a_chain(local: str, domain: str, hops: int) -> None:
    assume(not SRS.is_srs(local + "@x"))
    clock = Clock()
    sender = f"{local}@{domain}"
    forwarders = [SRS(f"hop{i}.test", [bytes([65 + i]) * 32], clock=clock) for i in range(hops + 1)]
    addresses = [sender]
    for fwd in forwarders:
        addresses.append(fwd.forward(addresses[-1]))
    # The last hop's bounce goes to the first forwarder, which finds the original sender.
    first = forwarders[-1].reverse(addresses[-1])
    assert first == addresses[1]
    assert forwarders[0].reverse(first) == sender


@settings(max_examples=200, deadline=None)
@given(local=dot_atoms, index=st.integers(0, 200), char=st.sampled_from(_ALPHABET))
def test_random_single_edit_never_verifies(local: str, index: int, char: str) -> None:
    assume(not SRS.is_srs(local + "@x"))
    srs = SRS("fwd.example", [KEY_A], clock=Clock())
    rewritten = srs.forward(f"{local}@example.org")
    head = local_of(rewritten)
    i = index % len(head)
    assume(head[i].lower() != char.lower())
    forged = head[:i] + char + head[i + 1 :] + "@fwd.example"
    with pytest.raises(SRSError):
        srs.reverse(forged)
