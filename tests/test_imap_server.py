"""The IMAP server on the encrypted store, driven by imaplib and a raw client over TLS."""

from __future__ import annotations

import base64
import imaplib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_imap_server_support import (
    APPEND_LIMIT,
    PASSWORD,
    ServerThread,
    message,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    s = ServerThread(tmp_path_factory.mktemp("imap") / "var")
    yield s
    s.stop()


def ok(result: tuple[str, list[object]]) -> list[object]:
    typ, data = result
    assert typ == "OK", data
    return data


def fetch_items(data: list[object]) -> list[bytes]:
    """imaplib FETCH data as one bytes blob per message (literals inlined)."""
    out: list[bytes] = []
    continued = False
    for item in data:
        if isinstance(item, tuple):
            if continued:
                out[-1] += item[0] + item[1]
            else:
                out.append(item[0] + item[1])
            continued = True
        elif isinstance(item, bytes):
            if continued and item[:1] in (b" ", b")"):
                out[-1] += item
            else:
                out.append(item)
            continued = not item.endswith(b")")
    return out


# ---- connecting and logging in -------------------------------------------------------


def test_logindisabled_until_starttls_then_login(server: ServerThread) -> None:
    user = server.new_user()
    client = server.imap_plain()
    try:
        caps = client.capabilities
        assert "LOGINDISABLED" in caps and "STARTTLS" in caps
        assert not any(c.startswith("AUTH=") for c in caps)
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            client.login(user, PASSWORD)
        client.starttls(ssl_context=server.ssl_context())
        assert "AUTH=PLAIN" in client.capabilities and "LOGINDISABLED" not in client.capabilities
        typ, data = client.login(user, PASSWORD)
        assert typ == "OK" and b"CAPABILITY" in data[0] and b"IDLE" in data[0]
        ok(client.select("INBOX"))
    finally:
        client.logout()


def test_login_with_password_app_password_and_sasl_plain(server: ServerThread) -> None:
    user = server.new_user()
    app_password = server.app_password(user)
    for secret in (PASSWORD, app_password):
        client = server.imaps()
        ok(client.login(user, secret))
        assert ok(client.select("INBOX")) == [b"0"]
        client.logout()
    # AUTHENTICATE PLAIN without SASL-IR (imaplib waits for the challenge)...
    client = server.imaps()
    ok(client.authenticate("PLAIN", lambda _: f"\0{user}\0{app_password}".encode()))
    client.logout()
    # ... and with it (RFC 4959), in one round trip.
    raw = server.raw()
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    _, tagged = raw.command(f"AUTHENTICATE PLAIN {token}")
    assert tagged.startswith(b"t1 OK [CAPABILITY IMAP4rev2")
    raw.close()


def test_wrong_password_and_unknown_user_get_the_same_no(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    _, wrong = raw.command(f'LOGIN {user} "not the password"')
    _, unknown = raw.command(f'LOGIN nobody@example.test "{PASSWORD}"')
    assert wrong.split(b" ", 1)[1] == unknown.split(b" ", 1)[1]
    assert b"NO [AUTHENTICATIONFAILED]" in wrong
    # The session goes on, and a right secret still works on it.
    _, tagged = raw.command(f'LOGIN {user} "{PASSWORD}"')
    assert b" OK " in tagged
    raw.close()


def test_unknown_command_is_bad_and_the_session_goes_on(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    for bad in ("FROBNICATE now", "FETCH 1:* (FLAGS)", "SELECT", 'LIST "" "*" RETURN (NOPE)'):
        _, tagged = raw.command(bad)
        assert tagged.split(b" ")[1] == b"BAD", (bad, tagged)
    raw.command("SELECT INBOX")
    _, tagged = raw.command("FETCH 5 (FLAGS)")  # no message 5
    assert b" BAD " in tagged
    raw.send(b"\x01\xff garbage\r\n")
    assert b"BAD" in raw.response()
    _, tagged = raw.command("NOOP")
    assert b" OK " in tagged
    raw.close()


def test_oversized_literals_are_refused_before_they_are_sent(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    # Before login only small literals are accepted (a LOGIN needs no megabytes).
    raw.send(b"a1 LOGIN {100000}\r\n")
    assert raw.response().startswith(b"a1 NO [TOOBIG]")
    raw.login(user)
    # After it, APPENDLIMIT: refused instead of "+", so the client sends nothing.
    raw.send(b"a2 APPEND INBOX {%d}\r\n" % (APPEND_LIMIT + 1))
    assert raw.response().startswith(b"a2 NO [TOOBIG]")
    _, tagged = raw.command("NOOP")
    assert b" OK " in tagged
    raw.close()
    client = server.login(user)
    typ, data = client.append("INBOX", None, None, b"x" * (APPEND_LIMIT + 10))
    assert typ == "NO" and b"[TOOBIG]" in data[0]  # type: ignore[operator]
    assert ok(client.select("INBOX")) == [b"0"]
    client.logout()


# ---- messages ---------------------------------------------------------------------------


def test_append_then_fetch_what_was_stored(server: ServerThread) -> None:
    user = server.new_user()
    client = server.login(user)
    raw = message(1, subject="Quarterly report", body="Numbers inside.\r\n.leading dot")
    when = imaplib.Time2Internaldate(time.mktime((2024, 3, 4, 10, 0, 0, 0, 0, -1)))
    typ, data = client.append("INBOX", r"(\Flagged $Important)", when, raw)
    assert typ == "OK" and re.match(rb"\[APPENDUID \d+ 1\]", data[0])
    assert ok(client.select("INBOX")) == [b"1"]
    items = fetch_items(
        ok(client.fetch("1", "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODY.PEEK[])"))
    )
    assert len(items) == 1
    item = items[0]
    assert b"UID 1 " in item
    # RFC 3501 §2.3.2: the first session to select the folder after the APPEND sees it
    # as \Recent.
    assert b"FLAGS ($Important \\Flagged \\Recent)" in item
    assert b"RFC822.SIZE %d" % len(raw) in item
    stored_date = imaplib.Internaldate2tuple(item)
    assert stored_date is not None and time.mktime(stored_date) == time.mktime(
        time.strptime("04-Mar-2024 10:00:00", "%d-%b-%Y %H:%M:%S")
    )
    assert b'"Quarterly report"' in item and b'(("Sender 1" NIL "sender1" "remote.test"))' in item
    assert item.endswith(raw + b")")
    # BODY.PEEK left \Seen alone; BODY[TEXT] sets it and reports the new flags.
    items = fetch_items(ok(client.fetch("1", "(BODY[TEXT])")))
    assert b"\\Seen" in items[0] and b"Numbers inside." in items[0]
    assert b"\\Seen" in ok(client.fetch("1", "(FLAGS)"))[0]  # type: ignore[operator]
    client.logout()


def test_store_copy_move_expunge_round_trip(server: ServerThread) -> None:
    user = server.new_user()
    client = server.login(user)
    for n in range(1, 6):
        ok(client.append("INBOX", None, None, message(n)))
    ok(client.create("Work"))
    ok(client.select("INBOX"))
    data = ok(client.store("2:3", "+FLAGS", r"(\Deleted)"))
    assert [d for d in data if b"\\Deleted" in d] == data and len(data) == 2  # type: ignore[operator]
    assert ok(client.store("1", "+FLAGS.SILENT", r"(\Answered)")) == [None]
    typ, data = client.copy("1:2", "Work")
    assert typ == "OK" and re.search(rb"\[COPYUID \d+ 1:2 1:2\]", data[-1])  # type: ignore[arg-type]
    typ, data = client._simple_command("UID", "MOVE", "4", "Work")
    assert typ == "OK"
    assert client.untagged_responses.get("EXPUNGE") == [b"4"]
    client.untagged_responses.clear()
    # EXPUNGE removes 2 and 3 (now 2 and 3 of 1,2,3,5): highest first.
    assert ok(client.expunge()) == [b"3", b"2"]
    assert ok(client.uid("SEARCH", "ALL")) == [b"1 5"]
    ok(client.select("Work"))
    flags = ok(client.fetch("1:*", "(UID FLAGS)"))
    # RFC 3501 §6.4.7: copies keep their flags and get \Recent (this is the first
    # session to select Work since they arrived).
    assert flags == [
        b"1 (UID 1 FLAGS (\\Answered \\Recent))",
        b"2 (UID 2 FLAGS (\\Deleted \\Recent))",
        b"3 (UID 3 FLAGS (\\Recent))",
    ]
    typ, data = client.copy("1", "Nowhere")
    assert typ == "NO" and b"TRYCREATE" in data[0]  # type: ignore[operator]
    client.logout()


def test_store_unchangedsince_reports_modified(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    for n in (1, 2):
        raw.command(b"APPEND INBOX {%d+}\r\n" % len(message(n)) + message(n))
    untagged, _ = raw.command("SELECT INBOX (CONDSTORE)")
    highest = int(re.search(rb"HIGHESTMODSEQ (\d+)", b"".join(untagged)).group(1))  # type: ignore[union-attr]
    raw.command("STORE 1 +FLAGS (\\Flagged)")
    untagged, tagged = raw.command(f"STORE 1:2 (UNCHANGEDSINCE {highest}) +FLAGS (\\Seen)")
    assert re.search(rb"OK \[MODIFIED 1\]", tagged), tagged
    assert untagged and untagged[0].startswith(b"* 2 FETCH (FLAGS (\\Seen \\Recent) MODSEQ (")
    raw.close()


def test_search_keys_esearch_and_saved_result(server: ServerThread) -> None:
    user = server.new_user()
    client = server.login(user)
    ok(client.append("INBOX", None, None, message(1, "Lunch on Friday", "Pizza or sushi?")))
    ok(client.append("INBOX", r"(\Seen)", None, message(2, "Quarterly report", "Revenue grew")))
    ok(client.append("INBOX", None, None, message(3, "Re: quarterly report", "Numbers look good")))
    ok(client.select("INBOX"))
    assert ok(client.search(None, "SUBJECT", "quarterly")) == [b"2 3"]
    assert ok(client.search(None, "FROM", "sender3@remote.test")) == [b"3"]
    assert ok(client.search(None, "BODY", "sushi")) == [b"1"]
    assert ok(client.search(None, "BODY", '"revenue grew"')) == [b"2"]
    assert ok(client.search(None, "TEXT", "lunch")) == [b"1"]
    assert ok(client.search(None, "UNSEEN")) == [b"1 3"]
    assert ok(client.search(None, "OR", "BODY", "pizza", "SUBJECT", "Re:")) == [b"1 3"]
    assert ok(client.search(None, "NOT", "BODY", "pizza")) == [b"2 3"]
    assert ok(client.search(None, "HEADER", "Message-ID", "<2@remote.test>")) == [b"2"]
    assert ok(client.search(None, "SENTON", "4-Mar-2024")) == [b"1 2 3"]
    assert ok(client.search(None, "SINCE", "1-Jan-2020", "LARGER", "10")) == [b"1 2 3"]
    assert ok(client.uid("SEARCH", "2:*")) == [b"2 3"]
    assert ok(client.search(None, "KEYWORD", "$Nothing")) == [b""]
    client.logout()


def test_search_esearch_and_save(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    for n in range(1, 5):
        raw.command(b"APPEND INBOX {%d+}\r\n" % len(message(n)) + message(n))
    raw.command("SELECT INBOX")
    raw.command("STORE 2,4 +FLAGS (\\Flagged)")
    untagged, tagged = raw.command("UID SEARCH RETURN (MIN MAX COUNT ALL) FLAGGED")
    assert untagged == [b'* ESEARCH (TAG "t8") UID MIN 2 MAX 4 ALL 2,4 COUNT 2\r\n']
    untagged, tagged = raw.command("SEARCH RETURN (SAVE) FLAGGED")
    assert untagged == [] and b" OK " in tagged
    untagged, _ = raw.command("FETCH $ (UID)")
    assert untagged == [b"* 2 FETCH (UID 2)\r\n", b"* 4 FETCH (UID 4)\r\n"]
    raw.close()


# ---- folders ----------------------------------------------------------------------------


def test_folders_create_rename_delete_subscribe_status(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    assert b" OK " in raw.command("CREATE Projects/2024/Q1")[1]
    assert b"ALREADYEXISTS" in raw.command("CREATE Projects")[1]
    assert b" OK " in raw.command("CREATE Receipts (USE (\\Archive))")[1]
    untagged, _ = raw.command('LIST "" "*"')
    assert b'* LIST (\\HasChildren) "/" Projects\r\n' in untagged
    assert b'* LIST (\\HasNoChildren) "/" Projects/2024/Q1\r\n' in untagged
    assert b'* LIST (\\HasNoChildren \\Archive) "/" Receipts\r\n' in untagged
    assert untagged[0].startswith(b'* LIST (\\HasNoChildren) "/" INBOX')
    untagged, _ = raw.command('LIST "" "%"')
    assert not any(b"Q1" in u for u in untagged)
    untagged, _ = raw.command('LIST "" ""')
    assert untagged == [b'* LIST (\\Noselect) "/" ""\r\n']
    # RFC 6154 SPECIAL-USE selection, RFC 5819 LIST-STATUS.
    untagged, _ = raw.command('LIST (SPECIAL-USE) "" "*" RETURN (STATUS (MESSAGES UIDNEXT))')
    names = [u for u in untagged if u.startswith(b"* LIST")]
    assert len(names) == 6 and all(b"\\" in n.split(b")")[0] for n in names)
    assert b"* STATUS Sent (MESSAGES 0 UIDNEXT 1)\r\n" in untagged
    # Subscriptions.
    raw.command("SUBSCRIBE Projects/2024/Q1")
    untagged, _ = raw.command('LSUB "" "Projects/*"')
    assert untagged == [b'* LSUB () "/" Projects/2024/Q1\r\n']
    untagged, _ = raw.command('LIST (SUBSCRIBED RECURSIVEMATCH) "" "Projects"')
    assert untagged == [b'* LIST (\\HasChildren) "/" Projects ("CHILDINFO" ("SUBSCRIBED"))\r\n']
    # Rename carries the children; delete refuses a parent, then works bottom-up.
    assert b" OK " in raw.command("RENAME Projects Archive/Projects")[1]
    untagged, _ = raw.command('LIST "" "Archive/*"')
    assert b'* LIST (\\HasNoChildren) "/" Archive/Projects/2024/Q1\r\n' in untagged
    assert b"HASCHILDREN" in raw.command("DELETE Archive/Projects")[1]
    assert b" OK " in raw.command("DELETE Archive/Projects/2024/Q1")[1]
    assert b"NONEXISTENT" in raw.command("DELETE Archive/Projects/2024/Q1")[1]
    assert b"NO" in raw.command("DELETE INBOX")[1]
    # A name reused after DELETE gets a new UIDVALIDITY (RFC 9051 §2.3.1.1).
    raw.command("CREATE Again")
    before = raw.command("STATUS Again (UIDVALIDITY)")[0][0]
    raw.command("DELETE Again")
    raw.command("CREATE Again")
    after = raw.command("STATUS Again (UIDVALIDITY)")[0][0]
    assert before != after
    body = message(7)
    raw.command(b"APPEND Again (\\Seen) {%d+}\r\n" % len(body) + body)
    untagged, _ = raw.command("STATUS Again (MESSAGES UNSEEN DELETED SIZE HIGHESTMODSEQ)")
    assert re.match(
        rb"\* STATUS Again \(MESSAGES 1 UNSEEN 0 DELETED 0 SIZE %d HIGHESTMODSEQ \d+\)" % len(body),
        untagged[0],
    )
    raw.close()


def test_utf8_and_mutf7_folder_names(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    # IMAP4rev1 clients name folders in modified UTF-7 (RFC 3501 §5.1.3)...
    assert b" OK " in raw.command("CREATE Entw&APw-rfe")[1]
    untagged, _ = raw.command('LIST "" "Entw*"')
    assert untagged == [b'* LIST (\\HasNoChildren) "/" Entw&APw-rfe\r\n']
    # ... and after ENABLE UTF8=ACCEPT the same folder is shown in UTF-8.
    raw.command("ENABLE UTF8=ACCEPT")
    untagged, _ = raw.command('LIST "" "Entw*"')
    assert untagged == ['* LIST (\\HasNoChildren) "/" "Entwürfe"\r\n'.encode()]
    raw.close()


def test_namespace_id_quota(server: ServerThread) -> None:
    user = server.new_user()
    client = server.login(user)
    assert ok(client.namespace()) == [b'(("" "/")) NIL NIL']
    raw = server.raw()
    untagged, tagged = raw.command('ID ("name" "test")')
    assert untagged == [b'* ID ("name" "Mailfort")\r\n'] and b" OK " in tagged
    raw.close()
    body = message(1, body="x" * 5000)
    ok(client.append("INBOX", None, None, body))
    typ, data = client.getquotaroot("INBOX")
    assert typ == "OK"
    assert data[0] == [b'INBOX ""']
    kib = (len(body) + 1023) // 1024
    assert data[1] == [b'"" (STORAGE %d 51200 MESSAGE 1 100000)' % kib]
    typ, data = client._simple_command("SETQUOTA", '""', "(STORAGE 1)")
    assert typ == "NO"
    client.logout()


# ---- several sessions, IDLE ---------------------------------------------------------------


def test_two_sessions_see_each_others_changes(server: ServerThread) -> None:
    user = server.new_user()
    a = server.raw()
    b = server.raw()
    a.login(user)
    b.login(user)
    for n in (1, 2, 3):
        body = message(n)
        a.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
    a.command("SELECT INBOX")
    b.command("SELECT INBOX")
    # B flags, A hears it at its next command.
    b.command("STORE 2 +FLAGS (\\Flagged)")
    # A selected first, so the three are \Recent to A alone (RFC 3501 §2.3.2).
    untagged, _ = a.command("NOOP")
    assert untagged == [b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Recent))\r\n"]
    # A appends and expunges; B hears EXPUNGE then EXISTS.
    body = message(4)
    untagged, _ = a.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
    assert untagged == [b"* 4 EXISTS\r\n", b"* 4 RECENT\r\n"]  # the selected folder grew
    a.command("STORE 1 +FLAGS.SILENT (\\Deleted)")
    untagged, _ = a.command("EXPUNGE")
    assert untagged == [b"* 1 EXPUNGE\r\n"]
    untagged, _ = b.command("NOOP")
    assert b"* 1 EXPUNGE\r\n" in untagged and b"* 3 EXISTS\r\n" in untagged
    # During FETCH (not UID FETCH) an expunge waits for a later command (RFC 9051 §7.5.1).
    b.command("STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.command("EXPUNGE")
    untagged, _ = a.command("FETCH 1:* (UID)")
    assert not any(b"EXPUNGE" in u for u in untagged)
    untagged, _ = a.command("NOOP")
    assert untagged == [b"* 1 EXPUNGE\r\n"]
    untagged, _ = a.command("FETCH 1:* (UID FLAGS)")
    assert untagged == [
        b"* 1 FETCH (UID 3 FLAGS (\\Recent))\r\n",
        b"* 2 FETCH (UID 4 FLAGS (\\Recent))\r\n",
    ]
    untagged, _ = b.command("FETCH 1:* (UID FLAGS)")
    assert untagged == [b"* 1 FETCH (UID 3 FLAGS ())\r\n", b"* 2 FETCH (UID 4 FLAGS ())\r\n"]
    a.close()
    b.close()


def _idle_until(raw: object, predicate: object, timeout: float) -> list[bytes]:
    from test_imap_server_support import RawImap

    assert isinstance(raw, RawImap) and callable(predicate)
    seen: list[bytes] = []
    deadline = time.monotonic() + timeout
    raw.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            seen.append(raw.response())
        except TimeoutError:
            continue
        if predicate(seen):
            break
    raw.settimeout(10)
    return seen


def test_idle_hears_another_session(server: ServerThread) -> None:
    user = server.new_user()
    idler = server.raw()
    idler.login(user)
    idler.command("SELECT INBOX")
    idler.send(b"i1 IDLE\r\n")
    assert idler.response().startswith(b"+ ")
    other = server.login(user)
    started = time.monotonic()
    ok(other.append("INBOX", None, None, message(1)))
    seen = _idle_until(idler, lambda s: b"* 1 EXISTS\r\n" in s, 5)
    assert b"* 1 EXISTS\r\n" in seen and time.monotonic() - started < 1.0
    ok(other.select("INBOX"))
    ok(other.store("1", "+FLAGS", r"(\Answered)"))
    seen = _idle_until(idler, lambda s: any(b"FETCH" in x for x in s), 5)
    assert seen[-1] == b"* 1 FETCH (UID 1 FLAGS (\\Answered \\Recent))\r\n"
    idler.send(b"DONE\r\n")
    assert idler.until("i1")[1].startswith(b"i1 OK")
    other.logout()
    idler.close()


def test_idle_hears_mail_delivered_by_another_process(server: ServerThread) -> None:
    from conftest import run_cli

    user = server.new_user()
    idler = server.raw()
    idler.login(user)
    idler.command("SELECT INBOX")
    idler.send(b"i1 IDLE\r\n")
    assert idler.response().startswith(b"+ ")
    result = run_cli(
        server.data_dir, "deliver", "--to", user, stdin=message(1, "Delivered by the LDA")
    )
    assert result.returncode == 0
    delivered = time.monotonic()
    seen = _idle_until(idler, lambda s: b"* 1 EXISTS\r\n" in s, 5)
    assert b"* 1 EXISTS\r\n" in seen, seen
    assert time.monotonic() - delivered < 2.0
    idler.send(b"DONE\r\n")
    assert idler.until("i1")[1].startswith(b"i1 OK")
    untagged, _ = idler.command("FETCH 1 (ENVELOPE)")
    assert b'"Delivered by the LDA"' in untagged[0]
    idler.close()


# ---- robustness, extensions ----------------------------------------------------------------

MALFORMED = [
    b"",  # replaced below: APPEND refuses empty messages
    b"\x00\x01\x02 not a message at all \xff\xfe",
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: message/rfc822'
    b'\r\n\r\n--b\r\nContent-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\n--b--',
    b"Subject: =?utf-8?q?broken=ZZ?= \xc3\x28\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbody",
    b'From: <<<@@@>>>\r\nTo: ,,,;;;\r\nDate: yesterday-ish\r\nContent-Type: text/plain; charset="\r\n'
    b"\r\n" + b"A" * 20000,
]


def test_malformed_messages_do_not_crash_fetch_or_search(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    for body in MALFORMED[1:]:
        _, tagged = raw.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
        assert b" OK " in tagged
    raw.command("SELECT INBOX")
    for items in (
        "(ENVELOPE BODYSTRUCTURE BODY RFC822.SIZE)",
        "(BODY.PEEK[] BODY.PEEK[1] BODY.PEEK[1.2.3] BODY.PEEK[2.HEADER] BODY.PEEK[1.MIME])",
        "(BODY.PEEK[HEADER.FIELDS (From Subject)] BODY.PEEK[TEXT]<5.10>)",
        "(BINARY.PEEK[1] BINARY.SIZE[1])",
        "(RFC822.HEADER RFC822.TEXT)",
    ):
        _untagged, tagged = raw.command(f"FETCH 1:* {items}")
        assert tagged.split(b" ")[1] in (b"OK", b"NO"), (items, tagged)
    _, tagged = raw.command("SEARCH OR FROM x TEXT y")
    assert b" OK " in tagged
    # The quoted-printable/unknown encoding answers NO [UNKNOWN-CTE] for BINARY only.
    _, tagged = raw.command("FETCH 3 (BINARY.PEEK[])")
    assert b"UNKNOWN-CTE" in tagged
    _, tagged = raw.command("NOOP")
    assert b" OK " in tagged
    raw.close()


def test_partial_binary_and_nested_sections(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    inner = b"Subject: inner\r\n\r\ninner body\r\n"
    body = (
        b"Subject: outer\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b"--XX\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"aGVsbG8AIHdvcmxk\r\n--XX\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--XX--\r\n"
    )
    raw.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
    raw.command("SELECT INBOX")
    untagged, _ = raw.command("FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[1] BODY.PEEK[2.HEADER])")
    assert untagged == [
        b"* 1 FETCH (BINARY[1] ~{12}\r\nhello\x00 world BINARY.SIZE[1] 12 "
        b"BODY[2.HEADER] {18}\r\nSubject: inner\r\n\r\n)\r\n"
    ]
    untagged, _ = raw.command("FETCH 1 (BODY.PEEK[2.TEXT] BODY.PEEK[]<0.7>)")
    assert untagged == [b"* 1 FETCH (BODY[2.TEXT] {10}\r\ninner body BODY[]<0> {7}\r\nSubject)\r\n"]
    raw.close()


def test_compress_deflate(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    raw.compress()
    body = message(1, body="compressible " * 200)
    _, tagged = raw.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
    assert b" OK " in tagged
    raw.command("SELECT INBOX")
    untagged, tagged = raw.command("FETCH 1 (BODY.PEEK[])")
    assert untagged[0].endswith(body + b")\r\n") and b" OK " in tagged
    _, tagged = raw.command("COMPRESS DEFLATE")
    assert b"COMPRESSIONACTIVE" in tagged
    raw.close()


def test_condstore_and_qresync_resync(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    for n in range(1, 5):
        body = message(n)
        raw.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
    untagged, _ = raw.command("SELECT INBOX")
    validity = int(re.search(rb"UIDVALIDITY (\d+)", b"".join(untagged)).group(1))  # type: ignore[union-attr]
    modseq = int(re.search(rb"HIGHESTMODSEQ (\d+)", b"".join(untagged)).group(1))  # type: ignore[union-attr]
    raw.command("STORE 2 +FLAGS.SILENT (\\Seen)")
    raw.command("STORE 3 +FLAGS.SILENT (\\Deleted)")
    raw.command("EXPUNGE")
    raw.command("LOGOUT")
    raw.close()
    raw = server.raw()
    raw.login(user)
    untagged, _ = raw.command("ENABLE QRESYNC")
    assert untagged == [b"* ENABLED QRESYNC\r\n"]
    untagged, tagged = raw.command(f"SELECT INBOX (QRESYNC ({validity} {modseq} 1:4))")
    assert b"* VANISHED (EARLIER) 3\r\n" in untagged
    assert any(
        re.match(rb"\* 2 FETCH \(UID 2 FLAGS \(\\Seen\) MODSEQ \(\d+\)\)", u) for u in untagged
    )
    assert b"[READ-WRITE]" in tagged
    untagged, _ = raw.command(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq} VANISHED)")
    assert untagged[0] == b"* VANISHED (EARLIER) 3\r\n"
    assert len(untagged) == 2 and b"UID 2" in untagged[1] and b"MODSEQ" in untagged[1]
    # With QRESYNC on, expunges are announced as VANISHED.
    raw.command("STORE 1 +FLAGS.SILENT (\\Deleted)")
    untagged, _ = raw.command("EXPUNGE")
    assert untagged[0] == b"* VANISHED 1\r\n"
    raw.close()


def test_starttls_discards_plaintext_sent_behind_it(server: ServerThread) -> None:
    import socket

    sock = socket.create_connection(("127.0.0.1", server.ports["imap"]), 10)
    sock.recv(4096)
    # An injected command in the same segment as STARTTLS must not run after TLS.
    sock.sendall(b"a STARTTLS\r\nb LOGIN x y\r\n")
    reply = b""
    while b"\r\n" not in reply:
        reply += sock.recv(4096)
    assert reply.startswith(b"a OK")
    tls = server.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1")
    tls.sendall(b"c NOOP\r\n")
    answer = tls.recv(4096)
    assert answer.startswith(b"c OK"), answer
    tls.close()


def test_large_mailbox_fetches_without_reading_messages(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailfort.imap.mailboxes import MailAccess
    from mailfort.mail import MessageMeta
    from mailfort.store.mailbox import AppendItem

    user = server.new_user()
    client = server.login(user)
    access: MailAccess = server.access
    # This user's mailbox (sessions of earlier tests may still be letting theirs go).
    shared = access._open[server.services.directory.route(user).users[0].mailbox_id]
    items = [AppendItem(message(n), ("\\Seen",) if n % 3 else (), 0) for n in range(10_000)]
    server.call(shared.mailbox.append("INBOX", items))
    decoded = 0
    original = MessageMeta.from_bytes

    def counting(data: bytes) -> MessageMeta:
        nonlocal decoded
        decoded += 1
        return original(data)

    monkeypatch.setattr(MessageMeta, "from_bytes", counting)
    ok(client.select("INBOX"))
    started = time.monotonic()
    data = ok(client.uid("FETCH", "1:*", "(FLAGS)"))
    flags_time = time.monotonic() - started
    # The first SELECT since they were filed: all 10,000 are \Recent to this session.
    assert len(data) == 10_000 and data[1] == b"2 (UID 2 FLAGS (\\Seen \\Recent))"
    started = time.monotonic()
    data = ok(client.fetch("1:*", "(ENVELOPE)"))
    assert len(data) == 10_000
    envelope_time = time.monotonic() - started
    assert ok(client.uid("SEARCH", "FROM", "sender9999@")) == [b"10000"]
    assert ok(client.search(None, "BODY", '"message 4242"')) == [b"4243"]
    assert decoded == 0
    # Generous bounds (imaplib's parsing dominates); the benchmark measures properly.
    assert flags_time < 3 and envelope_time < 5
    ok(client.store("1:*", "+FLAGS.SILENT", r"(\Flagged)"))
    assert ok(client.search(None, "UNFLAGGED")) == [b""]
    client.logout()


def test_mailfort_dev_serves_imap_and_pop3(tmp_path: Path) -> None:
    import json
    import poplib
    import signal
    import ssl
    import subprocess

    from conftest import mailfort_cmd

    data_dir = tmp_path / "dev"
    proc = subprocess.Popen(
        [*mailfort_cmd(), "--data-dir", str(data_dir), "dev"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Ctrl-C stops" in line:
                break
        info = json.loads((data_dir / "dev.json").read_text())
        ports = info["ports"]
        assert {"imap", "imaps", "pop3", "pop3s"} <= set(ports)
        ctx = ssl.create_default_context(cafile=str(data_dir / "tls" / "cert.pem"))
        client = imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=ctx)
        ok(client.login(info["user"], info["password"]))
        ok(client.select("INBOX"))
        client.logout()
        plain = imaplib.IMAP4("127.0.0.1", ports["imap"])
        assert "LOGINDISABLED" in plain.capabilities
        plain.starttls(ssl_context=ctx)
        ok(plain.login(info["user"], info["password"]))
        plain.logout()
        pop = poplib.POP3_SSL("127.0.0.1", ports["pop3s"], context=ctx)
        pop.user(info["user"])
        assert pop.pass_(info["password"]).startswith(b"+OK")
        pop.quit()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- against Dovecot's answers ------------------------------------------------------------


def test_envelope_and_bodystructure_match_dovecot_through_the_server(
    server: ServerThread,
) -> None:
    from mailfort.mail import SectionSpec, parse_message, section
    from test_mail_dovecot_reference import recorder_form

    from corpora import DOVECOT_REFERENCE, reference_cases

    if not DOVECOT_REFERENCE.exists():
        pytest.skip("corpora not present")
    cases = [case for case in reference_cases() if case.path.exists()]
    assert len(cases) > 150
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    for case in cases:
        body = case.read_message()
        _, tagged = raw.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
        assert b" OK " in tagged, case.name
    raw.command("SELECT INBOX")
    header_spec = SectionSpec("", "HEADER.FIELDS", (b"from", b"subject", b"content-type"))
    for seq, case in enumerate(cases, 1):
        untagged, _ = raw.command(f"FETCH {seq} (RFC822.SIZE ENVELOPE BODYSTRUCTURE)")
        wire = untagged[0]
        prefix = b"* %d FETCH " % seq
        assert wire.startswith(prefix) and wire.endswith(b"\r\n")
        want_seq = case.expected.split(" ", 1)[0]
        ours = recorder_form(want_seq.encode() + b" " + wire[len(prefix) : -2])
        assert ours == case.expected, case.name
        # The header-only fast path cuts what the full parser cuts.
        stored = case.read_message()
        untagged, _ = raw.command(
            f"FETCH {seq} (BODY.PEEK[HEADER] BODY.PEEK[HEADER.FIELDS (From Subject Content-Type)])"
        )
        msg = parse_message(stored)
        header = section(msg, stored, SectionSpec("", "HEADER")) or b""
        fields = section(msg, stored, header_spec) or b""
        expected = (
            prefix
            + b"(BODY[HEADER] {%d}\r\n" % len(header)
            + header
            + b" BODY[HEADER.FIELDS (From Subject Content-Type)] {%d}\r\n" % len(fields)
            + fields
            + b")\r\n"
        )
        assert untagged[0] == expected, case.name
    raw.close()


def test_uid_expunge_close_unselect_and_examine(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    for n in range(1, 6):
        body = message(n)
        raw.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
    raw.command("SELECT INBOX")
    raw.command("STORE 1:4 +FLAGS.SILENT (\\Deleted)")
    # RFC 4315 §2.1: only the named messages go, even though 1:4 are all \Deleted.
    untagged, _ = raw.command("UID EXPUNGE 2:3")
    assert untagged == [b"* 3 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    # UNSELECT leaves \Deleted messages; CLOSE expunges them silently.
    raw.command("UNSELECT")
    untagged, _ = raw.command("STATUS INBOX (MESSAGES DELETED)")
    assert untagged == [b"* STATUS INBOX (MESSAGES 3 DELETED 2)\r\n"]
    raw.command("SELECT INBOX")
    untagged, tagged = raw.command("CLOSE")
    assert untagged == [] and b" OK " in tagged
    untagged, _ = raw.command("STATUS INBOX (MESSAGES DELETED UNSEEN)")
    assert untagged == [b"* STATUS INBOX (MESSAGES 1 DELETED 0 UNSEEN 1)\r\n"]
    # EXAMINE is read-only: no STORE, no EXPUNGE, and BODY[] does not set \Seen.
    untagged, tagged = raw.command("EXAMINE INBOX")
    assert b"[READ-ONLY]" in tagged and b"* OK [PERMANENTFLAGS ()] Flags permitted\r\n" in untagged
    assert b" NO " in raw.command("STORE 1 +FLAGS (\\Seen)")[1]
    assert b" NO " in raw.command("EXPUNGE")[1]
    untagged, _ = raw.command("FETCH 1 (BODY[] FLAGS)")
    assert b"FLAGS ()" in untagged[0]
    raw.close()


def test_append_trycreate_rename_inbox_and_overquota(server: ServerThread) -> None:
    user = server.new_user()
    client = server.login(user)
    typ, data = client.append("Nowhere", None, None, message(1))
    assert typ == "NO" and b"[TRYCREATE]" in data[0]  # type: ignore[operator]
    ok(client.append("INBOX", None, None, message(1)))
    ok(client.append("INBOX", None, None, message(2)))
    # RFC 9051 §6.3.6: renaming INBOX moves its messages and leaves it empty.
    ok(client.rename("INBOX", '"Old mail"'))
    assert ok(client.select("INBOX")) == [b"0"]
    assert ok(client.select('"Old mail"')) == [b"2"]
    saved = server.access.quota_storage
    server.access.quota_storage = 100
    try:
        typ, data = client.append("INBOX", None, None, message(3))
        assert typ == "NO" and b"[OVERQUOTA]" in data[0]  # type: ignore[operator]
        typ, data = client.copy("1:2", "INBOX")
        assert typ == "NO" and b"[OVERQUOTA]" in data[0]  # type: ignore[operator]
        ok(client.uid("MOVE", "1:2", "INBOX"))  # moving does not grow the mailbox
    finally:
        server.access.quota_storage = saved
    assert ok(client.select("INBOX")) == [b"2"]
    client.logout()


# ---- the store additions ------------------------------------------------------------------


def test_a_version_1_mailbox_is_upgraded_on_open(tmp_path: Path) -> None:
    import asyncio

    from mailfort.keys.secrets import MailboxSecrets
    from mailfort.mail import extract_meta, to_wire
    from mailfort.store.mailbox import AppendItem, Mailbox

    key = MailboxSecrets.generate().data_key
    path = tmp_path / "old.mbx"
    mbx = Mailbox(path, key)
    asyncio.run(mbx.append("INBOX", [AppendItem(message(1)), AppendItem(message(2))]))
    # What a mailbox written before the IMAP server looked like.
    for stmt in (
        "DROP TABLE summaries",
        "DROP INDEX vanished_modseq",
        "DROP INDEX messages_content",
        "DROP TABLE counters",
    ):
        mbx.committer.submit(lambda c, s=stmt: c.execute(s)).result()
    mbx.committer.submit(lambda c: c.pragma("user_version", 1)).result()
    mbx.close()
    mbx = Mailbox(path, key)
    try:
        inbox = mbx.find_folder("INBOX")
        assert inbox is not None
        rows = mbx.message_columns(inbox.id, [(1, 10)], ("envelope", "size", "from"))
        assert [r[1] for r in rows] == [to_wire(extract_meta(message(n)).envelope) for n in (1, 2)]
        assert rows[0][2] == len(message(1)) and rows[1][3] == "Sender 2 <sender2@remote.test>"
        assert mbx.integrity_check() == "ok"
        # New folders continue the UIDVALIDITY sequence past the existing ones.
        folder = asyncio.run(mbx.create_folder("New"))
        assert folder.uidvalidity > max(f.uidvalidity for f in mbx.folders() if f.name != "New")
    finally:
        mbx.close()


def test_imap4rev2_client_gets_rev2_answers(server: ServerThread) -> None:
    user = server.new_user()
    raw = server.raw()
    raw.login(user)
    untagged, _ = raw.command("ENABLE IMAP4rev2")
    assert untagged == [b"* ENABLED IMAP4rev2\r\n"]
    body = message(1)
    raw.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
    untagged, _ = raw.command("SELECT INBOX")
    assert b'* LIST () "/" INBOX\r\n' in untagged  # RFC 9051 §6.3.2
    assert not any(b"RECENT" in u or b"UNSEEN" in u for u in untagged)
    # RFC 9051 §6.4.4: SEARCH answers with ESEARCH; no \Recent anywhere.
    untagged, _ = raw.command("SEARCH ALL")
    assert untagged == [b'* ESEARCH (TAG "t5") ALL 1\r\n']
    body = message(2)
    untagged, _ = raw.command(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
    assert untagged == [b"* 2 EXISTS\r\n"]
    untagged, _ = raw.command("FETCH 1:* (FLAGS)")
    assert untagged == [b"* 1 FETCH (FLAGS ())\r\n", b"* 2 FETCH (FLAGS ())\r\n"]
    raw.close()
