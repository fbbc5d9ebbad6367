"""DMARC's author domains: the fast path for plain From values gives exactly what
email.headerregistry gives (the path every value took before), whatever the value.

The From domain decides which DMARC policy applies, so a difference is a way around
DMARC: both paths are compared on hand-picked tricky values and on generated ones built
from the pieces that change how an address list parses.
"""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailfort.auth import dmarc
from mailfort.auth.dmarc import author_domains

SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(headers: Iterable[tuple[bytes, bytes]]) -> list[str] | None:
    """author_domains as it was: every From value through email.headerregistry."""
    domains: list[str] = []
    for name, value in headers:
        if name.strip().lower() != b"from":
            continue
        text = value.decode("utf-8", "replace").replace("\r\n", "").replace("\n", "").strip()
        for found in dmarc._parsed_from_domains(text):
            domain = dmarc.normalise_domain(found)
            if domain and domain not in domains:
                domains.append(domain)
    return domains or None


TRICKY = [
    b" Sender News <news@sender.test>\r\n",
    b" news@sender.test\r\n",
    b" <news@Sender.TEST>\r\n",
    b" John Q. Public <j@example.com>\r\n",
    b" .dot <a@example.com>\r\n",
    b" a@example.com, b@example.org\r\n",
    b" Group: a@example.com, b@example.org;\r\n",
    b" Undisclosed:;\r\n",
    b" a@example.com (comment b@evil.test)\r\n",
    b' "quoted <x@evil.test>" <a@example.com>\r\n',
    b' "a@evil.test"@example.com\r\n',
    b" =?utf-8?q?x=40evil.test?= <a@example.com>\r\n",
    b" =?utf-8?q?a=40evil.test?=@example.com\r\n",
    b" Name <a@example.com\r\n",
    b" Name <a@[192.0.2.1]>\r\n",
    b" Name\r\n <a@example.com>\r\n",
    b" Name <a@example.com> trailing\r\n",
    b" <a@example.com> <b@example.org>\r\n",
    b" a@b@example.com\r\n",
    b" \xc3\xa9 <a@example.com>\r\n",
    b" a@\xc3\xa9xample.com\r\n",
    b" <@route.test:a@example.com>\r\n",
    b" a@example.com.\r\n",
    b" a.@example.com\r\n",
    b" \r\n",
    b" junk\r\n",
]

_PIECES = st.sampled_from(
    [
        "a", "Name", "news", "x.y", ".", "..", " ", "\t", "\r\n ", "@", "<", ">", ",", ":",
        ";", '"', "\\", "(", ")", "[", "]", "=?utf-8?q?a=40b?=", "=?", "?=", "example.com",
        "Sender.TEST", "-", "é", "\x00", "!#$%&'*+/^_`{|}~",
    ]
)  # fmt: skip
_WORD = st.text(alphabet="aZ09.!#~-_", min_size=1, max_size=6)
_PLAINISH = st.builds(
    lambda name, local, domain, bare, junk_at, junk: (
        (f"{local}@{domain}" if bare else f"{name}<{local}@{domain}>")[:junk_at]
        + junk
        + (f"{local}@{domain}" if bare else f"{name}<{local}@{domain}>")[junk_at:]
    ),
    st.lists(_WORD, max_size=3).map(lambda w: " ".join(w) + (" " if w else "")),
    st.lists(_WORD, min_size=1, max_size=2).map(".".join),
    st.lists(_WORD, min_size=1, max_size=3).map(".".join),
    st.booleans(),
    st.integers(0, 40),
    st.one_of(st.just(""), _PIECES),
)
_ANY = st.lists(_PIECES, max_size=14).map("".join)
_VALUE = st.one_of(_PLAINISH, _ANY).map(lambda s: (" " + s + "\r\n").encode("utf-8"))
_NAME = st.sampled_from([b"From", b"from", b"FROM ", b"To", b"Sender"])


def test_tricky_values() -> None:
    for value in TRICKY:
        headers = [(b"From", value)]
        assert author_domains(headers) == reference(headers), value


def test_fast_path_is_taken_for_plain_values() -> None:
    # Not only equal answers: the common shapes must not reach the slow parser.
    for text in ("Sender News <news@sender.test>", "news@sender.test", "J. Q. P <a@b.c>"):
        assert dmarc._PLAIN_FROM.fullmatch(text) is not None


@SETTINGS
@given(st.lists(st.tuples(_NAME, _VALUE), max_size=4))
@example([(b"From", b" a@example.com\r\n"), (b"From", b" b@example.org\r\n")])
@example([(b"From", b" x <a@example.com>\r\n"), (b"from ", b" <a@EXAMPLE.com>\r\n")])
def test_same_domains_as_headerregistry(headers: list[tuple[bytes, bytes]]) -> None:
    assert author_domains(headers) == reference(headers)
