"""The POP3 server on the encrypted store, driven by poplib over STLS and implicit TLS."""

from __future__ import annotations

import poplib
from collections.abc import Iterator

import pytest

from test_imap_server_support import PASSWORD, ServerThread, message, pop3_auth_plain


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    s = ServerThread(tmp_path_factory.mktemp("pop3") / "var")
    yield s
    s.stop()


def fill(server: ServerThread, user: str, *bodies: bytes) -> list[int]:
    client = server.login(user)
    for body in bodies:
        typ, _ = client.append("INBOX", None, None, body)
        assert typ == "OK"
    client.select("INBOX")
    typ, data = client.uid("SEARCH", "ALL")
    client.logout()
    return [int(x) for x in data[0].split()]  # type: ignore[union-attr]


def uidvalidity(server: ServerThread, user: str) -> int:
    client = server.login(user)
    _typ, data = client.status("INBOX", "(UIDVALIDITY)")
    client.logout()
    return int(data[0].split()[-1].rstrip(b")"))  # type: ignore[union-attr]


def test_stls_required_before_login(server: ServerThread) -> None:
    user = server.new_user()
    client = server.pop3_plain()
    caps = client.capa()
    assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
    with pytest.raises(poplib.error_proto, match="STLS"):
        client.user(user)
    client.stls(context=server.ssl_context())
    caps = client.capa()
    assert "STLS" not in caps and "USER" in caps and caps["SASL"] == ["PLAIN"]
    client.user(user)
    assert client.pass_(PASSWORD).startswith(b"+OK")
    client.quit()


def test_password_app_password_and_sasl_plain(server: ServerThread) -> None:
    user = server.new_user()
    app_password = server.app_password(user)
    for secret in (PASSWORD, app_password):
        client = server.pop3s()
        client.user(user)
        assert client.pass_(secret).startswith(b"+OK")
        client.quit()
    client = server.pop3s()
    assert pop3_auth_plain(client, user, app_password).startswith(b"+OK")
    assert client.stat() == (0, 0)
    client.quit()


def test_wrong_password_and_unknown_user_answer_alike(server: ServerThread) -> None:
    user = server.new_user()
    answers = []
    for name, secret in ((user, "wrong secret"), ("nobody@example.test", PASSWORD)):
        client = server.pop3s()
        client.user(name)
        with pytest.raises(poplib.error_proto) as err:
            client.pass_(secret)
        answers.append(str(err.value))
        client.quit()
    assert answers[0] == answers[1] and "[AUTH]" in answers[0]


def test_list_uidl_retr_top_and_dot_stuffing(server: ServerThread) -> None:
    user = server.new_user()
    tricky = message(2, body=".starts with a dot\r\n..two dots\r\n.\r\nend")
    uids = fill(server, user, message(1), tricky)
    validity = uidvalidity(server, user)
    client = server.pop3s()
    client.user(user)
    client.pass_(PASSWORD)
    assert client.stat() == (2, len(message(1)) + len(tricky))
    _, listing, _ = client.list()
    assert listing == [b"1 %d" % len(message(1)), b"2 %d" % len(tricky)]
    # UIDL: <UIDVALIDITY>.<UID>, the IMAP identity of the same message.
    _, ids, _ = client.uidl()
    assert ids == [b"%d %d.%d" % (i + 1, validity, uid) for i, uid in enumerate(uids)]
    _, lines, _octets = client.retr(2)
    assert b"\r\n".join(lines) + b"\r\n" == tricky
    _, top, _ = client.top(2, 1)
    assert top[-2:] == [b"", b".starts with a dot"]
    with pytest.raises(poplib.error_proto):
        client.retr(3)
    client.quit()


def test_deletions_happen_at_quit_only(server: ServerThread) -> None:
    user = server.new_user()
    fill(server, user, message(1), message(2), message(3))
    client = server.pop3s()
    client.user(user)
    client.pass_(PASSWORD)
    client.dele(1)
    client.dele(2)
    client.rset()
    client.dele(2)
    # Dropped without QUIT: RFC 1939 §6, nothing is deleted.
    client.sock.close()
    client = server.pop3s()
    client.user(user)
    client.pass_(PASSWORD)
    assert client.stat()[0] == 3
    client.dele(2)
    assert client.stat()[0] == 2  # marked, not yet gone
    client.quit()
    imap = server.login(user)
    imap.select("INBOX")
    _typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (Subject)])")
    subjects = [item[1] for item in data if isinstance(item, tuple)]
    assert subjects == [b"Subject: message 1\r\n\r\n", b"Subject: message 3\r\n\r\n"]
    imap.logout()


def test_pop3_deletion_reaches_a_selected_imap_session(server: ServerThread) -> None:
    user = server.new_user()
    fill(server, user, message(1), message(2))
    raw = server.raw()
    raw.login(user)
    raw.command("SELECT INBOX")
    client = server.pop3s()
    client.user(user)
    client.pass_(PASSWORD)
    client.dele(1)
    client.quit()
    untagged, _ = raw.command("NOOP")
    assert untagged == [b"* 1 EXPUNGE\r\n"]
    raw.close()


def test_unknown_command_and_long_line(server: ServerThread) -> None:
    user = server.new_user()
    client = server.pop3s()
    client.user(user)
    client.pass_(PASSWORD)
    with pytest.raises(poplib.error_proto):
        client._shortcmd("FROB")
    assert client.noop().startswith(b"+OK")
    with pytest.raises((poplib.error_proto, EOFError, ConnectionError)):
        client._shortcmd("NOOP " + "x" * 5000)
