"""Response serialisation: quoting, literals, codes, FETCH items (RFC 9051 §7)."""

from __future__ import annotations

import datetime as dt

from mailfort.imap import response as r
from mailfort.imap.commands import FetchBody, Section
from mailfort.imap.sequence import SequenceSet


def test_string_quoted_or_literal() -> None:
    assert r.string("hello") == b'"hello"'
    assert r.string('a "b" \\c') == b'"a \\"b\\" \\\\c"'
    assert r.string("two\r\nlines") == b"{10}\r\ntwo\r\nlines"
    assert r.string("é") == b"{2}\r\n\xc3\xa9"  # 8-bit needs a literal in IMAP4rev1
    assert r.string("é", utf8=True) == b'"\xc3\xa9"'  # but not with UTF8=ACCEPT
    assert r.string(b"\xff", utf8=True) == b"{1}\r\n\xff"  # not UTF-8: literal
    assert r.string("x" * 2000).startswith(b"{2000}\r\n")
    assert r.string(b"a\x00b") == b"~{3}\r\na\x00b"


def test_astring_and_nil() -> None:
    assert r.astring("INBOX") == b"INBOX"
    assert r.astring("a b") == b'"a b"'
    assert r.astring("") == b'""'
    assert r.astring("NIL") == b'"NIL"'
    assert r.astring("a]b") == b"a]b"
    assert r.astring("a%b") == b'"a%b"'
    assert r.render(None) == b"NIL"


def test_render_nested_values() -> None:
    value: r.Value = [r.Atom("\\Seen"), 12, "x y", None, [b"raw"], r.Literal(b"abc")]
    assert r.render(value) == b'(\\Seen 12 "x y" NIL ("raw") {3}\r\nabc)'
    assert r.render(r.Literal(b"\x00", binary=True)) == b"~{1}\r\n\x00"


def test_mailbox_names_per_client() -> None:
    assert r.render(r.MailboxName("INBOX")) == b"INBOX"
    assert r.render(r.MailboxName("台北")) == b"&U,BTFw-"
    assert r.render(r.MailboxName("台北"), utf8=True) == '"台北"'.encode()
    assert r.render(r.MailboxName("Sent Items")) == b'"Sent Items"'
    assert r.render(r.MailboxName("R&D")) == b"R&-D"
    assert r.render(r.MailboxName("R&D"), utf8=True) == b"R&D"


def test_tagged_and_untagged_status() -> None:
    resp = r.TaggedResponse("a1", r.Status.OK, "done", r.ResponseCode.simple("READ-WRITE"))
    assert resp.to_bytes() == b"a1 OK [READ-WRITE] done\r\n"
    resp = r.TaggedResponse("a2", r.Status.NO, "bad\r\ninjection")
    assert resp.to_bytes() == b"a2 NO bad  injection\r\n"
    assert r.StatusResponse(
        r.Status.OK, "x", r.ResponseCode.uidvalidity(3857529045)
    ).to_bytes() == (b"* OK [UIDVALIDITY 3857529045] x\r\n")
    assert r.bye().to_bytes() == b"* BYE Logging out\r\n"


def test_response_codes() -> None:
    code = r.ResponseCode.copyuid(
        38505, SequenceSet.of((304, 304), (319, 320)), SequenceSet.of((3956, 3958))
    )
    assert code.to_bytes() == b"[COPYUID 38505 304,319:320 3956:3958]"
    assert (
        r.ResponseCode.appenduid(38505, SequenceSet.of(3955)).to_bytes()
        == b"[APPENDUID 38505 3955]"
    )
    assert r.ResponseCode.permanentflags(["\\Deleted", "\\Seen"]).to_bytes() == (
        b"[PERMANENTFLAGS (\\Deleted \\Seen \\*)]"
    )
    assert r.ResponseCode.badcharset().to_bytes() == b"[BADCHARSET (US-ASCII UTF-8)]"
    assert r.ResponseCode.highestmodseq(715194045007).to_bytes() == b"[HIGHESTMODSEQ 715194045007]"
    assert r.ResponseCode.modified(SequenceSet.of(7, 9)).to_bytes() == b"[MODIFIED 7,9]"


def test_data_responses() -> None:
    assert r.capability(["IMAP4rev2", "IDLE"]).to_bytes() == b"* CAPABILITY IMAP4rev2 IDLE\r\n"
    assert r.exists(172).to_bytes() == b"* 172 EXISTS\r\n"
    assert r.expunge(3).to_bytes() == b"* 3 EXPUNGE\r\n"
    assert r.flags(["\\Answered", "\\Seen"]).to_bytes() == b"* FLAGS (\\Answered \\Seen)\r\n"
    assert r.enabled(["CONDSTORE"]).to_bytes() == b"* ENABLED CONDSTORE\r\n"
    assert r.vanished(SequenceSet.of(41, (43, 116)), earlier=True).to_bytes() == (
        b"* VANISHED (EARLIER) 41,43:116\r\n"
    )
    assert r.search([2, 84, 882], modseq=917162500).to_bytes() == (
        b"* SEARCH 2 84 882 (MODSEQ 917162500)\r\n"
    )
    assert r.search([]).to_bytes() == b"* SEARCH\r\n"
    assert r.status("blurdybloop", [("MESSAGES", 231), ("UIDNEXT", 44292)]).to_bytes() == (
        b"* STATUS blurdybloop (MESSAGES 231 UIDNEXT 44292)\r\n"
    )
    assert r.status("Archive", [("APPENDLIMIT", None)]).to_bytes() == (
        b"* STATUS Archive (APPENDLIMIT NIL)\r\n"
    )


def test_list_responses() -> None:
    assert r.list_response(["\\HasNoChildren"], "/", "INBOX").to_bytes() == (
        b'* LIST (\\HasNoChildren) "/" INBOX\r\n'
    )
    assert r.list_response(["\\Noselect"], None, "").to_bytes() == b'* LIST (\\Noselect) NIL ""\r\n'
    resp = r.list_response(
        ["\\Subscribed"], "/", "Foo", [("CHILDINFO", [b"SUBSCRIBED"])]
    ).to_bytes()
    assert resp == b'* LIST (\\Subscribed) "/" Foo ("CHILDINFO" ("SUBSCRIBED"))\r\n'
    assert r.lsub_response([], "/", "Sent Items").to_bytes() == b'* LSUB () "/" "Sent Items"\r\n'


def test_esearch() -> None:
    resp = r.esearch("A282", uid=False, minimum=2, count=3)
    assert resp.to_bytes() == b'* ESEARCH (TAG "A282") MIN 2 COUNT 3\r\n'
    resp = r.esearch("A283", uid=True, all_=SequenceSet.from_numbers([2, 10, 11]))
    assert resp.to_bytes() == b'* ESEARCH (TAG "A283") UID ALL 2,10:11\r\n'
    assert r.esearch("t", uid=False, count=0).to_bytes() == b'* ESEARCH (TAG "t") COUNT 0\r\n'


def test_fetch_response_with_body_literal() -> None:
    body = FetchBody(Section((), "HEADER.FIELDS", ("DATE", "FROM")), peek=True)
    items: list[tuple[str, r.Value]] = [
        ("UID", 4),
        ("FLAGS", [r.Atom("\\Seen")]),
        (
            "INTERNALDATE",
            r.format_datetime(
                dt.datetime(1996, 7, 17, 2, 44, 25, tzinfo=dt.timezone(dt.timedelta(hours=-7)))
            ),
        ),
        ("MODSEQ", [12121231000]),
        (body.response_name(), b"From: a@b\r\n\r\n"),
    ]
    assert r.fetch(12, items).to_bytes() == (
        b'* 12 FETCH (UID 4 FLAGS (\\Seen) INTERNALDATE "17-Jul-1996 02:44:25 -0700"'
        b" MODSEQ (12121231000) BODY[HEADER.FIELDS (DATE FROM)] {13}\r\nFrom: a@b\r\n\r\n)\r\n"
    )


def test_envelope() -> None:
    env = r.envelope(
        date="Wed, 17 Jul 1996 02:23:25 -0700 (PDT)",
        subject="IMAP4rev2 WG mtg summary and minutes",
        from_=[r.address("Terry Gray", "gray", "cac.washington.edu")],
        sender=None,
        reply_to=None,
        to=[r.address(None, "imap", "cac.washington.edu")],
        cc=None,
        bcc=None,
        in_reply_to=None,
        message_id="<B27397-0100000@cac.washington.edu>",
    )
    assert r.render(env) == (
        b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev2 WG mtg summary and minutes"'
        b' (("Terry Gray" NIL "gray" "cac.washington.edu"))'
        b' (("Terry Gray" NIL "gray" "cac.washington.edu"))'
        b' (("Terry Gray" NIL "gray" "cac.washington.edu"))'
        b' ((NIL NIL "imap" "cac.washington.edu")) NIL NIL NIL'
        b' "<B27397-0100000@cac.washington.edu>")'
    )


def test_namespace_id_quota() -> None:
    assert r.namespace([("", "/")]).to_bytes() == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
    assert r.id_response([("name", "mailfort")]).to_bytes() == b'* ID ("name" "mailfort")\r\n'
    assert r.id_response(None).to_bytes() == b"* ID NIL\r\n"
    assert r.quota("", [("STORAGE", 10, 512)]).to_bytes() == b'* QUOTA "" (STORAGE 10 512)\r\n'
    assert r.quotaroot("INBOX", [""]).to_bytes() == b'* QUOTAROOT INBOX ""\r\n'


def test_continuation() -> None:
    assert r.ContinuationResponse("idling").to_bytes() == b"+ idling\r\n"
    assert r.ContinuationResponse().to_bytes() == b"+ \r\n"
    assert r.ContinuationResponse(challenge=b"").to_bytes() == b"+ \r\n"
    assert r.ContinuationResponse(challenge=b"abc").to_bytes() == b"+ YWJj\r\n"


def test_format_datetime_naive_is_utc() -> None:
    assert r.format_datetime(dt.datetime(2024, 1, 5, 9, 8, 7)) == "05-Jan-2024 09:08:07 +0000"
