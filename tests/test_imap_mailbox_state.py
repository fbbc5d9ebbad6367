"""\\Recent (RFC 3501 §2.3.2), INTERNALDATE zones, quota and pipelined APPEND as IMAP
clients see them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from test_imap_server_support import RawImap, ServerThread, message


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    s = ServerThread(tmp_path_factory.mktemp("imap-recent") / "var")
    yield s
    s.stop()


def append(raw: RawImap, n: int, folder: str = "INBOX", date: str | None = None) -> bytes:
    body = message(n)
    when = f' "{date}"' if date else ""
    _, tagged = raw.command(f"APPEND {folder}{when} {{{len(body)}+}}\r\n".encode() + body)
    assert b" OK " in tagged, tagged
    return tagged


def session(server: ServerThread, user: str) -> RawImap:
    raw = server.raw()
    raw.login(user)
    return raw


# ---- \Recent ----------------------------------------------------------------------------


def test_recent_belongs_to_the_first_session_that_selects(server: ServerThread) -> None:
    user = server.new_user()
    writer = session(server, user)
    append(writer, 1)
    append(writer, 2)
    # EXAMINE sees them as recent but takes nothing away (RFC 3501 §6.3.2).
    examiner = session(server, user)
    untagged, _ = examiner.command("EXAMINE INBOX")
    assert b"* 2 RECENT\r\n" in untagged
    untagged, _ = examiner.command("FETCH 1:* (FLAGS)")
    assert untagged == [b"* 1 FETCH (FLAGS (\\Recent))\r\n", b"* 2 FETCH (FLAGS (\\Recent))\r\n"]
    untagged, _ = writer.command("STATUS INBOX (MESSAGES RECENT)")
    assert untagged == [b"* STATUS INBOX (MESSAGES 2 RECENT 2)\r\n"]

    first = session(server, user)
    untagged, _ = first.command("SELECT INBOX")
    assert b"* 2 EXISTS\r\n" in untagged and b"* 2 RECENT\r\n" in untagged
    untagged, _ = first.command("FETCH 1:* (FLAGS)")
    assert untagged == [b"* 1 FETCH (FLAGS (\\Recent))\r\n", b"* 2 FETCH (FLAGS (\\Recent))\r\n"]
    first.command("STORE 1 +FLAGS.SILENT (\\Seen)")
    assert first.command("SEARCH RECENT")[0] == [b"* SEARCH 1 2\r\n"]
    assert first.command("SEARCH NEW")[0] == [b"* SEARCH 2\r\n"]  # recent and unseen
    assert first.command("SEARCH OLD")[0] == [b"* SEARCH\r\n"]

    second = session(server, user)
    untagged, _ = second.command("SELECT INBOX")
    assert b"* 2 EXISTS\r\n" in untagged and b"* 0 RECENT\r\n" in untagged
    untagged, _ = second.command("FETCH 1:* (FLAGS)")
    assert untagged == [b"* 1 FETCH (FLAGS (\\Seen))\r\n", b"* 2 FETCH (FLAGS ())\r\n"]
    assert second.command("SEARCH RECENT")[0] == [b"* SEARCH\r\n"]
    assert second.command("SEARCH OLD")[0] == [b"* SEARCH 1 2\r\n"]
    # Claimed, so no longer counted for the next session (RFC 3501 §6.3.10).
    untagged, _ = writer.command("STATUS INBOX (RECENT)")
    assert untagged == [b"* STATUS INBOX (RECENT 0)\r\n"]

    # New mail while both are selected: recent to whichever hears of it first.
    append(writer, 3)
    untagged, _ = second.command("NOOP")
    assert untagged == [b"* 3 EXISTS\r\n", b"* 1 RECENT\r\n"]
    untagged, _ = first.command("NOOP")
    assert untagged == [b"* 3 EXISTS\r\n", b"* 2 RECENT\r\n"]
    assert second.command("FETCH 3 (FLAGS)")[0] == [b"* 3 FETCH (FLAGS (\\Recent))\r\n"]
    assert first.command("FETCH 3 (FLAGS)")[0] == [b"* 3 FETCH (FLAGS ())\r\n"]
    # The claims are in the mailbox: a later login sees none of them as recent.
    for raw in (writer, examiner, first, second):
        raw.close()
    later = session(server, user)
    untagged, _ = later.command("SELECT INBOX")
    assert b"* 3 EXISTS\r\n" in untagged and b"* 0 RECENT\r\n" in untagged
    later.close()


def test_imap4rev2_sessions_neither_see_nor_claim_recent(server: ServerThread) -> None:
    user = server.new_user()
    rev2 = session(server, user)
    rev2.command("ENABLE IMAP4rev2")
    append(rev2, 1)
    untagged, _ = rev2.command("SELECT INBOX")
    assert not any(b"RECENT" in u for u in untagged)
    append(rev2, 2)  # announced to the selected rev2 session
    untagged, _ = rev2.command("FETCH 1:* (FLAGS)")
    assert untagged == [b"* 1 FETCH (FLAGS ())\r\n", b"* 2 FETCH (FLAGS ())\r\n"]
    # RFC 9051 has no \Recent, so the rev2 session took nothing from a rev1 one.
    rev1 = session(server, user)
    untagged, _ = rev1.command("SELECT INBOX")
    assert b"* 2 RECENT\r\n" in untagged
    rev1.close()
    rev2.close()


def test_renaming_inbox_keeps_what_was_claimed(server: ServerThread) -> None:
    user = server.new_user()
    raw = session(server, user)
    append(raw, 1)
    raw.command("SELECT INBOX")  # claims message 1
    append(raw, 2)  # seen arriving by this selected session: claimed too
    raw.command("UNSELECT")
    append(raw, 3)  # nobody selected INBOX since: still to be claimed
    raw.command("RENAME INBOX Saved")
    other = session(server, user)
    untagged, _ = other.command("SELECT Saved")
    assert b"* 3 EXISTS\r\n" in untagged and b"* 1 RECENT\r\n" in untagged
    assert other.command("SEARCH RECENT")[0] == [b"* SEARCH 3\r\n"]
    other.close()
    raw.close()


# ---- INTERNALDATE --------------------------------------------------------------------


def test_internaldate_keeps_the_zone_append_gave(server: ServerThread) -> None:
    user = server.new_user()
    raw = session(server, user)
    append(raw, 1, date="04-Mar-2024 23:30:00 -0800")  # 5 March in UTC
    append(raw, 2, date=" 5-Mar-2024 01:15:00 +0530")  # 4 March in UTC
    append(raw, 3)  # now, in UTC
    raw.command("SELECT INBOX")
    untagged, _ = raw.command("FETCH 1:2 (INTERNALDATE)")
    assert untagged == [
        b'* 1 FETCH (INTERNALDATE "04-Mar-2024 23:30:00 -0800")\r\n',
        b'* 2 FETCH (INTERNALDATE "05-Mar-2024 01:15:00 +0530")\r\n',
    ]
    assert raw.command("FETCH 3 (INTERNALDATE)")[0][0].endswith(b' +0000")\r\n')
    # RFC 3501 §6.4.4: dates compare "disregarding time and timezone": as written.
    assert raw.command("SEARCH ON 4-Mar-2024")[0] == [b"* SEARCH 1\r\n"]
    assert raw.command("SEARCH ON 5-Mar-2024")[0] == [b"* SEARCH 2\r\n"]
    assert raw.command("SEARCH BEFORE 5-Mar-2024")[0] == [b"* SEARCH 1\r\n"]
    assert raw.command("SEARCH SINCE 5-Mar-2024 BEFORE 1-Jan-2025")[0] == [b"* SEARCH 2\r\n"]
    # COPY keeps the internal date, zone included (RFC 3501 §6.4.7).
    raw.command("COPY 1 Archive")
    raw.command("SELECT Archive")
    untagged, _ = raw.command("FETCH 1 (INTERNALDATE)")
    assert untagged == [b'* 1 FETCH (INTERNALDATE "04-Mar-2024 23:30:00 -0800")\r\n']
    raw.close()


def test_a_bad_append_date_is_refused(server: ServerThread) -> None:
    user = server.new_user()
    raw = session(server, user)
    body = message(1)
    for date in ("04-Mar-2024 23:30:00 +2400", "31-Feb-2024 10:00:00 +0000", "yesterday"):
        _, tagged = raw.command(f'APPEND INBOX "{date}" {{{len(body)}+}}\r\n'.encode() + body)
        assert b" BAD " in tagged, (date, tagged)
    assert raw.command("STATUS INBOX (MESSAGES)")[0] == [b"* STATUS INBOX (MESSAGES 0)\r\n"]
    # The far ends of what the syntax allows are kept as given.
    append(raw, 1, date="01-Jan-0001 00:00:00 +2359")
    append(raw, 2, date="31-Dec-9999 23:59:59 -2359")
    raw.command("SELECT INBOX")
    untagged, _ = raw.command("FETCH 1:2 (INTERNALDATE)")
    assert untagged == [
        b'* 1 FETCH (INTERNALDATE "01-Jan-0001 00:00:00 +2359")\r\n',
        b'* 2 FETCH (INTERNALDATE "31-Dec-9999 23:59:59 -2359")\r\n',
    ]
    assert raw.command("SEARCH BEFORE 2-Jan-0001")[0] == [b"* SEARCH 1\r\n"]
    raw.close()


# ---- quota ---------------------------------------------------------------------------


def test_quota_is_exact_after_expunge_and_over_quota_append_is_refused(
    server: ServerThread,
) -> None:
    user = server.new_user()
    raw = session(server, user)
    size = len(message(1))
    saved = server.access.quota_storage, server.access.quota_messages
    server.access.quota_storage, server.access.quota_messages = None, 2
    try:
        append(raw, 1)
        append(raw, 2)
        body = message(3)
        _, tagged = raw.command(f"APPEND INBOX {{{len(body)}+}}\r\n".encode() + body)
        assert b"NO [OVERQUOTA]" in tagged
        untagged, _ = raw.command('GETQUOTA ""')
        assert untagged == [b'* QUOTA "" (MESSAGE 2 2)\r\n']
        raw.command("SELECT INBOX")
        raw.command("STORE 1 +FLAGS.SILENT (\\Deleted)")
        raw.command("EXPUNGE")
        append(raw, 3)
        server.access.quota_storage, server.access.quota_messages = 3 * size, None
        untagged, _ = raw.command('GETQUOTA ""')
        kib = (2 * size + 1023) // 1024
        assert untagged == [f'* QUOTA "" (STORAGE {kib} {3 * size // 1024})\r\n'.encode()]
    finally:
        server.access.quota_storage, server.access.quota_messages = saved
    raw.close()


def test_delivery_to_a_full_mailbox_is_refused_while_it_is_open(server: ServerThread) -> None:
    from mailfort.store.quota import Quota
    from mailfort.store.service import QuotaExceeded, Recipient

    user = server.new_user()
    raw = session(server, user)  # open: delivery goes straight into the mailbox
    store = server.services.store
    found = server.services.directory.route(user).users[0]
    rcpt = Recipient(found.mailbox_id, found.public_keys)
    saved = store.quota
    store.quota = Quota(None, 1)
    try:
        server.call(store.deliver(rcpt, message(1)))
        with pytest.raises(QuotaExceeded):
            server.call(store.deliver(rcpt, message(2)))
    finally:
        store.quota = saved
    untagged, _ = raw.command("STATUS INBOX (MESSAGES)")
    assert untagged == [b"* STATUS INBOX (MESSAGES 1)\r\n"]
    raw.close()


# ---- pipelined APPEND ----------------------------------------------------------------------


def test_pipelined_appends_are_answered_in_order_each_on_its_own(server: ServerThread) -> None:
    user = server.new_user()
    raw = session(server, user)
    raw.command("SELECT INBOX")
    saved = server.access.quota_messages
    server.access.quota_messages = 3
    try:
        commands = []
        for n, folder in enumerate(("INBOX", "INBOX", "Nowhere", "Archive", "INBOX", "INBOX")):
            body = message(n)
            tag = "same" if n in (0, 1) else f"p{n}"  # a reused tag answers twice
            commands.append(
                (tag, f"{tag} APPEND {folder} {{{len(body)}+}}\r\n".encode() + body + b"\r\n")
            )
        raw.send(b"".join(c for _, c in commands) + b"p9 NOOP\r\n")
        seen = []
        while not (seen and seen[-1].startswith(b"p9 ")):
            seen.append(raw.response())
    finally:
        server.access.quota_messages = saved
    tagged = [line for line in seen if not line.startswith(b"* ")]
    assert [t.split(b" ")[0] for t in tagged] == [
        b"same",
        b"same",
        b"p2",
        b"p3",
        b"p4",
        b"p5",
        b"p9",
    ]
    assert b"[APPENDUID " in tagged[0] and tagged[0].split(b" ")[4] == b"1]"
    assert b"[APPENDUID " in tagged[1] and tagged[1].split(b" ")[4] == b"2]"
    assert b"NO [TRYCREATE]" in tagged[2]
    assert b"OK [APPENDUID " in tagged[3] and tagged[3].endswith(b" 1] APPEND completed\r\n")
    assert b"NO [OVERQUOTA]" in tagged[4] and b"NO [OVERQUOTA]" in tagged[5]
    assert b"* 2 EXISTS\r\n" in seen  # the selected INBOX grew by the two filed there
    untagged, _ = raw.command("UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert [u.split(b"Subject: ")[1][:10] for u in untagged] == [b"message 0\r", b"message 1\r"]
    raw.close()
