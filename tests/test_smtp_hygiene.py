"""`mailfort.smtp.hygiene`: the fast checks give what their plain regular expressions give."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailfort.smtp import hygiene

SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces that make or almost make a Received field, anywhere in a header section.
_PIECES = st.sampled_from(
    [
        *(b"Received", b"received", b"RECEIVED", b"Received-SPF", b"X-Received", b"Re"),
        *(b"ceived", b" ", b"\t", b":", b"\r\n", b"\n", b"\r", b"a", b"\r\n\r\n", b"\xc3\x89"),
    ]
)
_REFERENCE = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


@SETTINGS
@given(st.lists(_PIECES, max_size=50).map(b"".join))
@example(b"Received: a\r\nReceived\t :b\r\n\r\nReceived: in the body\r\n")
@example(b"received:")
@example(b"X-Received: a\r\n Received: folded\r\n")
def test_received_count_matches_the_regex(raw: bytes) -> None:
    head = hygiene.header_block(raw)
    assert hygiene.received_count(raw) == len(_REFERENCE.findall(head))


@SETTINGS
@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"a", b"\r\r\n", b"\n\r"]), max_size=30))
def test_bare_line_ends_match_the_regex(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", raw) is not None
    assert hygiene.has_bare_line_end(raw) == bare


def test_a_long_trace_counts_every_hop_of_the_header_only() -> None:
    trace = b"".join(b"Received: from hop%d.test; Sat, 28 Nov 2026\r\n" % i for i in range(26))
    raw = trace + b"Subject: x\r\n\r\nReceived: quoted in the body\r\n"
    assert hygiene.received_count(raw) == 26 > hygiene.MAX_RECEIVED
