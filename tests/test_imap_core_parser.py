"""The IMAP command parser on command strings from the RFCs and from real clients."""

from __future__ import annotations

import datetime as dt

import pytest

from mailfort.imap import commands as c
from mailfort.imap.parser import ParseError, parse_one
from mailfort.imap.sequence import STAR, SequenceSet
from mailfort.imap.wire import FrameError


def parse(data: str | bytes, *, utf8: bool = False) -> c.Command:
    raw = data.encode() if isinstance(data, str) else data
    if not raw.endswith(b"\n"):
        raw += b"\r\n"
    result = parse_one(raw, utf8=utf8)
    assert not isinstance(result, ParseError | FrameError), result
    return result


def bad(data: str | bytes, *, utf8: bool = False) -> ParseError:
    raw = data.encode() if isinstance(data, str) else data
    if not raw.endswith(b"\n"):
        raw += b"\r\n"
    result = parse_one(raw, utf8=utf8)
    assert isinstance(result, ParseError), result
    return result


# ------------------------------------------------------------ any / not authenticated


def test_simple_commands() -> None:
    assert parse("abcd CAPABILITY") == c.Capability("abcd")
    assert parse("a002 NOOP") == c.Noop("a002")
    assert parse("A023 LOGOUT") == c.Logout("A023")
    assert parse("a002 STARTTLS") == c.StartTLS("a002")
    assert parse("1 capability") == c.Capability("1")  # Thunderbird writes lower case


def test_login_rfc_example_and_quoted_forms() -> None:
    assert parse("a001 LOGIN SMITH SESAME") == c.Login("a001", "SMITH", "SESAME")
    # Outlook quotes both; passwords may contain escaped quotes and backslashes.
    cmd = parse(r'A1 LOGIN "user@example.com" "p\"a\\ss word"')
    assert cmd == c.Login("A1", "user@example.com", 'p"a\\ss word')
    assert "p\\" not in repr(cmd)  # the password is kept out of logs


def test_login_with_literals() -> None:
    cmd = parse(b"a LOGIN {4}\r\nfred {11}\r\nfat man \xc3\xa9x\r\n")
    assert cmd == c.Login("a", "fred", "fat man éx")


def test_authenticate_sasl_ir() -> None:
    # RFC 4959 §3 example, and the "=" empty initial response.
    cmd = parse("a001 AUTHENTICATE PLAIN dGVzdAB0ZXN0AHRlc3Q=")
    assert cmd == c.Authenticate("a001", "PLAIN", b"test\x00test\x00test")
    assert parse("a AUTHENTICATE plain =") == c.Authenticate("a", "PLAIN", b"")
    assert parse("2 AUTHENTICATE PLAIN") == c.Authenticate("2", "PLAIN", None)
    assert bad("a AUTHENTICATE PLAIN !!!").text.startswith("Invalid base64")


def test_id() -> None:
    # RFC 2971 §3.1 example, and Apple Mail's ID.
    cmd = parse('a023 ID ("name" "sodr" "version" "19.34" "vendor" "Pink Floyd Music Limited")')
    assert isinstance(cmd, c.Id) and cmd.params is not None
    assert dict(cmd.params)["vendor"] == "Pink Floyd Music Limited"
    apple = parse(
        'A1 ID ("name" "Mac OS X Mail" "version" "16.0 (3696.120.41.1.1)" "os" "Mac OS X"'
        ' "os-version" "12.2 (21D49)" "vendor" "Apple Inc.")'
    )
    assert isinstance(apple, c.Id) and apple.params and len(apple.params) == 5
    assert parse("a ID NIL") == c.Id("a", None)
    assert parse("a ID ()") == c.Id("a", ())
    assert parse('a ID ("x" NIL)') == c.Id("a", (("x", None),))
    assert bad('a ID ("' + "k" * 31 + '" "v")').text == "ID field or value too long"


# ------------------------------------------------------------ authenticated


def test_enable() -> None:
    assert parse("a1 ENABLE CONDSTORE") == c.Enable("a1", ("CONDSTORE",))
    assert parse("t2 ENABLE qresync IMAP4rev2 UTF8=ACCEPT") == c.Enable(
        "t2", ("QRESYNC", "IMAP4REV2", "UTF8=ACCEPT")
    )
    bad("a ENABLE")


def test_select_examine() -> None:
    assert parse("A142 SELECT INBOX") == c.Select("A142", "INBOX")
    assert parse('6 SELECT "inbox"') == c.Select("6", "INBOX")  # INBOX is case-insensitive
    assert parse("A932 EXAMINE blurdybloop") == c.Select("A932", "blurdybloop", read_only=True)
    assert parse('5 select "INBOX" (CONDSTORE)') == c.Select("5", "INBOX", condstore=True)


def test_select_qresync_rfc7162_examples() -> None:
    cmd = parse("A02 SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))")
    assert isinstance(cmd, c.Select) and cmd.qresync is not None
    q = cmd.qresync
    assert (q.uidvalidity, q.modseq) == (67890007, 20050715194045000)
    assert q.known_uids == SequenceSet(((41, 41), (43, 211), (214, 541)))
    cmd = parse(
        "B04 SELECT INBOX (QRESYNC (67890007 90060115194045000 1:29997 (5000,7500,9000,9990:9999"
        " 15000,22500,27000,29970,29973,29976,29979,29982,29985,29988,29991,29994,29997)))"
    )
    assert isinstance(cmd, c.Select) and cmd.qresync is not None
    assert cmd.qresync.known_seqs is not None and cmd.qresync.known_seq_uids is not None
    assert cmd.qresync.known_seqs.contains(9995, 10000)
    # Apple Mail style: no known-uids, just uidvalidity and modseq.
    cmd = parse("7 SELECT INBOX (QRESYNC (1 4))")
    assert isinstance(cmd, c.Select) and cmd.qresync == c.QResync(1, 4)
    bad("a SELECT INBOX (QRESYNC (0 4))")
    bad("a SELECT INBOX (FOO)")


def test_create_delete_rename_subscribe() -> None:
    assert parse("A003 CREATE owatagusiam/") == c.Create("A003", "owatagusiam/")
    assert parse("t1 CREATE MySpecialArchive (USE (\\Archive))") == c.Create(
        "t1", "MySpecialArchive", ("\\Archive",)
    )
    err = bad("t1 CREATE X (USE (\\Bogus))")
    assert (err.status, err.code) == ("NO", "USEATTR")
    assert parse("A683 DELETE blurdybloop") == c.Delete("A683", "blurdybloop")
    assert parse("A683 RENAME blurdybloop sarasoop") == c.Rename("A683", "blurdybloop", "sarasoop")
    assert parse("A002 SUBSCRIBE #news.comp.mail.mime") == c.Subscribe(
        "A002", "#news.comp.mail.mime"
    )
    assert parse('A002 UNSUBSCRIBE "a b"') == c.Unsubscribe("A002", "a b")


def test_mailbox_names_modified_utf7_and_utf8() -> None:
    # RFC 3501 §5.1.3 example name.
    cmd = parse("a CREATE ~peter/mail/&U,BTFw-/&ZeVnLIqe-")
    assert cmd == c.Create("a", "~peter/mail/台北/日本語")
    # An IMAP4rev1 client that sends raw UTF-8 anyway is understood.
    assert parse(b'a SELECT "Entw\xc3\xbcrfe"') == c.Select("a", "Entwürfe")
    # With UTF8=ACCEPT/IMAP4rev2, "&" is an ordinary character.
    assert parse('a SELECT "R&D"', utf8=True) == c.Select("a", "R&D")
    assert parse('a SELECT "R&-D"') == c.Select("a", "R&D")
    assert bad('a SELECT "R&D"').text.startswith("Invalid mailbox name")
    assert bad(b'a SELECT "\xff"').text.startswith("Invalid mailbox name")


def test_list_basic_rfc_examples() -> None:
    assert parse('A101 LIST "" ""') == c.List("A101", "", ("",))
    assert parse('A102 LIST #news.comp.mail.misc ""') == c.List(
        "A102", "#news.comp.mail.misc", ("",)
    )
    assert parse("A202 LIST ~/Mail/ %") == c.List("A202", "~/Mail/", ("%",))
    assert parse('A682 LIST "" *') == c.List("A682", "", ("*",))
    assert parse('5 LIST "" "*"') == c.List("5", "", ("*",))


def test_list_extended() -> None:
    cmd = parse('A04 LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)')
    assert isinstance(cmd, c.List)
    assert cmd.selection == {"SUBSCRIBED", "RECURSIVEMATCH"}
    assert cmd.returns.children and cmd.returns.subscribed and cmd.extended
    # RFC 5819 LIST-STATUS and RFC 6154 SPECIAL-USE.
    cmd = parse('A01 LIST "" % RETURN (STATUS (MESSAGES UNSEEN))')
    assert isinstance(cmd, c.List) and cmd.returns.status == ("MESSAGES", "UNSEEN")
    cmd = parse('t3 LIST (SPECIAL-USE) "" "*"')
    assert isinstance(cmd, c.List) and cmd.selection == {"SPECIAL-USE"}
    # Thunderbird.
    cmd = parse('4 list (subscribed) "" "*" return (special-use)')
    assert isinstance(cmd, c.List) and cmd.returns.special_use
    cmd = parse('A LIST "" ("INBOX" "Drafts" "Sent/%")')
    assert isinstance(cmd, c.List) and cmd.patterns == ("INBOX", "Drafts", "Sent/%")
    assert bad('A LIST (RECURSIVEMATCH) "" "*"').text.startswith("RECURSIVEMATCH")
    bad('A LIST (BOGUS) "" "*"')


def test_lsub_namespace_status() -> None:
    assert parse('12 lsub "" "*"') == c.Lsub("12", "", "*")
    assert parse("A001 NAMESPACE") == c.Namespace("A001")
    assert parse("A042 STATUS blurdybloop (UIDNEXT MESSAGES)") == c.Status(
        "A042", "blurdybloop", ("UIDNEXT", "MESSAGES")
    )
    cmd = parse('8 STATUS "Sent" (UIDNEXT MESSAGES UNSEEN RECENT SIZE HIGHESTMODSEQ APPENDLIMIT)')
    assert isinstance(cmd, c.Status) and "SIZE" in cmd.items
    bad("a STATUS INBOX ()")
    bad("a STATUS INBOX (BOGUS)")


def test_append_with_flags_and_date() -> None:
    msg = b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\nSubject: afternoon meeting\r\n\r\nHello\r\n"
    data = b"A003 APPEND saved-messages (\\Seen) {%d}\r\n%s\r\n" % (len(msg), msg)
    cmd = parse(data)
    assert isinstance(cmd, c.Append) and cmd.mailbox == "saved-messages"
    (m,) = cmd.messages
    assert m.flags == ("\\Seen",) and m.data == msg and m.internal_date is None
    data = b'a APPEND Drafts (\\Draft $MDNSent) " 7-Feb-1994 22:43:04 -0800" {5+}\r\nhello\r\n'
    cmd = parse(data)
    assert isinstance(cmd, c.Append)
    when = cmd.messages[0].internal_date
    assert when == dt.datetime(1994, 2, 7, 22, 43, 4, tzinfo=dt.timezone(dt.timedelta(hours=-8)))
    assert cmd.messages[0].flags == ("\\Draft", "$MDNSent")


def test_multiappend_and_literal8() -> None:
    # RFC 3502 §6.3.11 shape with two messages; the second as literal8 (RFC 3516).
    data = (
        b"A003 APPEND saved-messages (\\Seen) {3}\r\nabc"
        b' (\\Seen) "07-Feb-1994 22:43:04 -0800" ~{4}\r\na\x00bc\r\n'
    )
    cmd = parse(data)
    assert isinstance(cmd, c.Append) and len(cmd.messages) == 2
    assert cmd.messages[1].binary and cmd.messages[1].data == b"a\x00bc"
    # mbsync with LITERAL+
    cmd = parse(b'9 APPEND "Sent" (\\Seen) {5+}\r\nhello\r\n')
    assert isinstance(cmd, c.Append) and cmd.messages[0].data == b"hello"
    # RFC 6855 §4: UTF8 (literal8) from a UTF8=ACCEPT client.
    msg = "Subject: Grüße\r\n\r\nhi\r\n".encode()
    cmd = parse(b"a APPEND INBOX UTF8 (~{%d+}\r\n%s)\r\n" % (len(msg), msg))
    assert isinstance(cmd, c.Append) and cmd.messages[0].utf8 and cmd.messages[0].data == msg
    bad(b"a APPEND INBOX UTF8 ({2+}\r\nhi)\r\n")


def test_append_errors() -> None:
    bad("a APPEND INBOX")
    bad('a APPEND INBOX (\\Seen) "hello"')
    assert bad(b"a APPEND INBOX (\\Recent) {1+}\r\nx\r\n").text.startswith("Invalid system flag")
    bad(b'a APPEND INBOX "31-Feb-2020 00:00:00 +0000" {1+}\r\nx\r\n')


def test_quota_commands() -> None:
    # RFC 9208 §4 examples.
    assert parse('G0001 GETQUOTA "!partition/sda4"') == c.GetQuota("G0001", "!partition/sda4")
    assert parse("S0000 GETQUOTAROOT INBOX") == c.GetQuotaRoot("S0000", "INBOX")
    assert parse('S0001 SETQUOTA "" (STORAGE 512)') == c.SetQuota("S0001", "", (("STORAGE", 512),))
    assert parse('S0002 SETQUOTA "" ()') == c.SetQuota("S0002", "", ())


def test_idle_compress_unselect() -> None:
    assert parse("A002 IDLE") == c.Idle("A002")
    assert parse("a COMPRESS DEFLATE") == c.Compress("a", "DEFLATE")
    assert parse("A342 UNSELECT") == c.Unselect("A342")
    assert parse("a CLOSE") == c.Close("a")
    assert parse("a CHECK") == c.Check("a")
    assert parse("a EXPUNGE") == c.Expunge("a")
    bad("a IDLE now")


# ------------------------------------------------------------ selected: FETCH


def test_fetch_rfc_examples() -> None:
    cmd = parse("A654 FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)])")
    assert isinstance(cmd, c.Fetch)
    assert cmd.messages == SequenceSet(((2, 4),))
    assert cmd.attributes == (
        c.FetchSimple("FLAGS"),
        c.FetchBody(c.Section((), "HEADER.FIELDS", ("DATE", "FROM"))),
    )
    assert cmd.attributes[1].response_name() == "BODY[HEADER.FIELDS (DATE FROM)]"


def test_fetch_macros() -> None:
    cmd = parse("a FETCH 1:* ALL")
    assert isinstance(cmd, c.Fetch) and cmd.macro == "ALL"
    assert [a.name for a in cmd.attributes if isinstance(a, c.FetchSimple)] == [
        "FLAGS",
        "INTERNALDATE",
        "RFC822.SIZE",
        "ENVELOPE",
    ]
    cmd = parse("a FETCH 1 fast")
    assert isinstance(cmd, c.Fetch) and len(cmd.attributes) == 3
    cmd = parse("a FETCH 1 FULL")
    assert isinstance(cmd, c.Fetch) and c.FetchSimple("BODY") in cmd.attributes
    bad("a FETCH 1 (ALL)")


def test_uid_fetch_adds_uid_and_clients_idioms() -> None:
    cmd = parse("A999 UID FETCH 4827313:4828442 FLAGS")
    assert isinstance(cmd, c.Fetch) and cmd.uid
    assert cmd.attributes == (c.FetchSimple("FLAGS"), c.FetchSimple("UID"))
    # mbsync
    cmd = parse("7 UID FETCH 1:1000000000 (UID FLAGS)")
    assert isinstance(cmd, c.Fetch) and len(cmd.attributes) == 2
    cmd = parse("8 UID FETCH 34 (BODY.PEEK[HEADER.FIELDS (X-TUID)])")
    assert isinstance(cmd, c.Fetch)
    body = cmd.attributes[0]
    assert isinstance(body, c.FetchBody) and body.peek and not body.sets_seen
    # Thunderbird
    cmd = parse(
        "7 UID fetch 120:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc"
        " Subject Date Message-ID Priority X-Priority References Newsgroups In-Reply-To"
        " Content-Type Reply-To)])"
    )
    assert isinstance(cmd, c.Fetch)
    assert cmd.messages == SequenceSet(((120, STAR),))
    cmd = parse("13 uid fetch 121 (UID RFC822.SIZE BODY.PEEK[]<0.32768>)")
    assert isinstance(cmd, c.Fetch)
    peek = cmd.attributes[2]
    assert isinstance(peek, c.FetchBody) and peek.partial == (0, 32768)
    assert peek.response_name() == "BODY[]<0>"
    # Outlook
    cmd = parse("A5 UID FETCH 1:50 (UID RFC822.SIZE FLAGS INTERNALDATE BODY.PEEK[HEADER])")
    assert isinstance(cmd, c.Fetch) and len(cmd.attributes) == 5


def test_fetch_sections() -> None:
    cmd = parse("a FETCH 1 (BODY[1.2.MIME] BODY[3.TEXT] BODY[] RFC822.HEADER BODYSTRUCTURE)")
    assert isinstance(cmd, c.Fetch)
    a, b, d = cmd.attributes[:3]
    assert a == c.FetchBody(c.Section((1, 2), "MIME"))
    assert b == c.FetchBody(c.Section((3,), "TEXT"))
    assert d == c.FetchBody(c.Section())
    cmd = parse("a FETCH 1 BODY[4.2.HEADER.FIELDS.NOT (Received X-Spam)]")
    assert isinstance(cmd, c.Fetch)
    assert cmd.attributes[0] == c.FetchBody(
        c.Section((4, 2), "HEADER.FIELDS.NOT", ("Received", "X-Spam"))
    )
    # The response echoes the client's spelling (some clients compare it literally).
    name = cmd.attributes[0].response_name()
    assert name == "BODY[4.2.HEADER.FIELDS.NOT (Received X-Spam)]"
    bad("a FETCH 1 BODY[1.]")
    bad("a FETCH 1 BODY[.TEXT]")
    bad("a FETCH 1 BODY[MIME]")
    bad("a FETCH 1 BODY[0]")
    bad("a FETCH 1 BODY[1.BOGUS]")
    bad("a FETCH 1 BODY[HEADER.FIELDS ()]")
    bad("a FETCH 1 (FLAGS")
    bad("a FETCH 1 ()")


def test_fetch_binary() -> None:
    # RFC 3516 §4.2/§4.3.
    cmd = parse("a003 FETCH 1 (BINARY[1.1]<0.100> BINARY.PEEK[2] BINARY.SIZE[1])")
    assert isinstance(cmd, c.Fetch)
    b1, b2, b3 = cmd.attributes
    assert isinstance(b1, c.FetchBody) and b1.binary and b1.partial == (0, 100)
    assert b1.response_name() == "BINARY[1.1]<0>"
    assert isinstance(b2, c.FetchBody) and b2.peek and b2.response_name() == "BINARY[2]"
    assert isinstance(b3, c.FetchBody) and b3.size_only and b3.response_name() == "BINARY.SIZE[1]"
    bad("a FETCH 1 BINARY[1.HEADER]")


def test_fetch_condstore_qresync_modifiers() -> None:
    # RFC 7162 §3.1.4.1 and §3.2.6 examples.
    cmd = parse("s100 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)")
    assert isinstance(cmd, c.Fetch) and cmd.changed_since == 12345
    assert c.FetchSimple("MODSEQ") in cmd.attributes
    cmd = parse("s100 UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345 VANISHED)")
    assert isinstance(cmd, c.Fetch) and cmd.vanished
    cmd = parse("a FETCH 1 (MODSEQ EMAILID THREADID)")
    assert isinstance(cmd, c.Fetch) and len(cmd.attributes) == 3
    bad("a FETCH 1:* (FLAGS) (CHANGEDSINCE 12345 VANISHED)")  # VANISHED needs UID FETCH
    bad("a UID FETCH 1:* (FLAGS) (VANISHED)")  # ... and CHANGEDSINCE
    bad("a UID FETCH 1:* (FLAGS) (CHANGEDSINCE 0)")


# ------------------------------------------------------------ selected: STORE, COPY, ...


def test_store() -> None:
    assert parse("A003 STORE 2:4 +FLAGS (\\Deleted)") == c.Store(
        "A003", False, SequenceSet(((2, 4),)), "+", False, ("\\Deleted",)
    )
    assert parse("a STORE 1 FLAGS.SILENT (\\seen \\ANSWERED)") == c.Store(
        "a", False, SequenceSet(((1, 1),)), "", True, ("\\Seen", "\\Answered")
    )
    # Thunderbird spells it "+Flags", and some clients drop the parentheses.
    cmd = parse("9 uid store 121 +Flags (\\Seen)")
    assert isinstance(cmd, c.Store) and cmd.uid and cmd.mode == "+"
    cmd = parse("a STORE 1 -FLAGS $Junk \\Flagged")
    assert isinstance(cmd, c.Store) and cmd.flags == ("$Junk", "\\Flagged")
    # RFC 7162 §3.1.3 example.
    cmd = parse("a103 UID STORE 6,4,8 (UNCHANGEDSINCE 12121230045) +FLAGS.SILENT (\\Deleted)")
    assert isinstance(cmd, c.Store) and cmd.unchanged_since == 12121230045 and cmd.silent
    assert bad("a STORE 1 +FLAGS (\\Recent)").text.startswith("Invalid system flag")
    bad("a STORE 1 +FLAGZ (\\Seen)")


def test_copy_move_expunge() -> None:
    assert parse("A003 COPY 2:4 MEETING") == c.Copy(
        "A003", False, SequenceSet(((2, 4),)), "MEETING"
    )
    assert parse("a UID MOVE 42:69 foo") == c.Move("a", True, SequenceSet(((42, 69),)), "foo")
    assert parse("a MOVE 1 Trash") == c.Move("a", False, SequenceSet(((1, 1),)), "Trash")
    assert parse("A202 UID EXPUNGE 3000:3002") == c.UidExpunge("A202", SequenceSet(((3000, 3002),)))
    assert parse('a UID COPY 1:* "Archive/2024"') == c.Copy(
        "a", True, SequenceSet(((1, STAR),)), "Archive/2024"
    )


# ------------------------------------------------------------ selected: SEARCH


def test_search_rfc9051_examples() -> None:
    cmd = parse('A282 SEARCH RETURN (MIN COUNT) FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"')
    assert isinstance(cmd, c.Search)
    assert cmd.returns == ("MIN", "COUNT")
    assert cmd.criteria == c.SearchAnd(
        (
            c.SearchFlag("\\Flagged"),
            c.SearchDate("since", dt.date(1994, 2, 1)),
            c.SearchNot(c.SearchHeader("from", "Smith")),
        )
    )
    cmd = parse('A283 SEARCH RETURN () FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"')
    assert isinstance(cmd, c.Search) and cmd.returns == ()
    cmd = parse('A284 SEARCH TEXT "string not in mailbox"')
    assert isinstance(cmd, c.Search) and cmd.returns is None
    assert cmd.criteria == c.SearchText("string not in mailbox", headers=True)


def test_search_charset_literal() -> None:
    # RFC 9051 §6.4.4 example A285: a UTF-8 literal.
    word = "Данные".encode()
    cmd = parse(b"A285 SEARCH CHARSET UTF-8 TEXT {%d}\r\n%s\r\n" % (len(word), word))
    assert isinstance(cmd, c.Search) and cmd.charset == "UTF-8"
    assert cmd.criteria == c.SearchText("Данные", headers=True)
    err = bad("A286 SEARCH CHARSET BOGUS TEXT foo")
    assert err.status == "NO" and err.code == "BADCHARSET (US-ASCII UTF-8)"
    assert err.response() == b"A286 NO [BADCHARSET (US-ASCII UTF-8)] Unsupported charset\r\n"


def test_search_or_not_parentheses() -> None:
    cmd = parse("a SEARCH OR (SEEN FLAGGED) NOT (DELETED UNANSWERED) 1:5")
    assert isinstance(cmd, c.Search)
    assert cmd.criteria == c.SearchAnd(
        (
            c.SearchOr(
                c.SearchAnd((c.SearchFlag("\\Seen"), c.SearchFlag("\\Flagged"))),
                c.SearchNot(
                    c.SearchAnd((c.SearchFlag("\\Deleted"), c.SearchFlag("\\Answered", False)))
                ),
            ),
            c.SearchSequence(SequenceSet(((1, 5),))),
        )
    )


def test_search_all_keys() -> None:
    program = (
        "ALL ANSWERED BCC x BEFORE 1-Jan-2020 BODY y CC z DELETED DRAFT FLAGGED FROM a"
        ' HEADER X-Mailer "" KEYWORD $Forwarded LARGER 100 NEW OLD ON 02-Mar-2021 RECENT'
        " SEEN SENTBEFORE 1-Jan-2020 SENTON 1-Jan-2020 SENTSINCE 1-Jan-2020 SINCE 1-Jan-2020"
        " SMALLER 5000 SUBJECT hello TEXT t TO u UID 1:*,7 UNANSWERED UNDELETED UNDRAFT"
        " UNFLAGGED UNKEYWORD $Junk UNSEEN 1,3:* OLDER 60 YOUNGER 3600 MODSEQ 5"
        ' MODSEQ "/flags/\\\\draft" all 620162338 EMAILID M123 THREADID T9 $'
    )
    cmd = parse("a SEARCH " + program)
    assert isinstance(cmd, c.Search) and isinstance(cmd.criteria, c.SearchAnd)
    kinds = {type(k) for k in cmd.criteria.keys}
    assert kinds >= {
        c.SearchAll,
        c.SearchFlag,
        c.SearchHeader,
        c.SearchDate,
        c.SearchText,
        c.SearchSize,
        c.SearchSequence,
        c.SearchWithin,
        c.SearchModSeq,
        c.SearchObjectId,
    }
    modseq = [k for k in cmd.criteria.keys if isinstance(k, c.SearchModSeq)]
    assert modseq[1] == c.SearchModSeq(620162338, "/flags/\\draft", "all")
    assert cmd.criteria.keys[-1] == c.SearchSequence(SequenceSet(saved=True))


def test_search_clients() -> None:
    # Apple Mail / mbsync idioms.
    cmd = parse("A9 UID SEARCH 1:* NOT DELETED")
    assert isinstance(cmd, c.Search) and cmd.uid
    cmd = parse("A10 UID SEARCH UNDELETED")
    assert isinstance(cmd, c.Search) and cmd.criteria == c.SearchFlag("\\Deleted", False)
    cmd = parse("a UID SEARCH RETURN (SAVE) UID 100:* SMALLER 4096")
    assert isinstance(cmd, c.Search) and cmd.returns == ("SAVE",)
    cmd = parse("A283 FETCH $ (UID INTERNALDATE FLAGS RFC822.SIZE)")
    assert isinstance(cmd, c.Fetch) and cmd.messages.saved


def test_search_errors() -> None:
    bad("a SEARCH")
    bad("a SEARCH BOGUS")
    bad("a SEARCH FROM")
    bad("a SEARCH (SEEN")
    bad("a SEARCH SINCE 31-Feb-2020")
    bad("a SEARCH SINCE 1-Foo-2020")
    bad("a SEARCH RETURN (BOGUS) ALL")
    bad("a SEARCH OR SEEN")
    assert bad("a SEARCH " + "NOT " * 200 + "SEEN").text == "Search program nested too deeply"
    assert bad("a SEARCH " + "(" * 200 + "SEEN" + ")" * 200).text.startswith("Search program")


# ------------------------------------------------------------ malformed input


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (" NOOP", "Missing or invalid tag"),
        ("+ NOOP", "Missing or invalid tag"),
        ("a", "Expected a space"),
        ("a FOO", "Unknown command FOO"),
        ("a NOOP extra", "Unexpected extra arguments"),
        ("a LOGIN onlyuser", "Expected a space"),
        ("a SELECT", "Expected a space"),
        ("a FETCH 0 FLAGS", "Invalid sequence set"),
        ("a FETCH 1:: FLAGS", "Invalid sequence set"),
        ("a FETCH 99999999999 FLAGS", "Invalid sequence set"),
        ("a FETCH 1 BOGUS", "Unknown fetch attribute BOGUS"),
        ("a UID BOGUS 1", "Unknown UID command BOGUS"),
        ('a LOGIN "unterminated', "Invalid quoted string"),
        ("a  NOOP", "Expected a command name"),
    ],
)
def test_malformed_commands_give_bad(line: str, text: str) -> None:
    err = bad(line)
    assert err.text == text
    assert err.response().endswith(b"\r\n")


def test_long_garbage_is_echoed_short() -> None:
    err = bad("a " + "X" * 500)
    assert len(err.response()) < 100
