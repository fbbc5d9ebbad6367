"""The `mailfort` command as an operator runs it: real subprocesses on a real data dir."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailfort.directory.service import Directory

from conftest import run_cli
from tests_support import MESSAGE, add_user


def test_domain_user_alias_commands(data_dir: Path) -> None:
    assert run_cli(data_dir, "domain", "add", "Example.TEST").stdout.strip() == "example.test"
    assert run_cli(data_dir, "domain", "list").stdout.split() == ["example.test"]
    out = run_cli(data_dir, "user", "add", "alice@example.test").stdout
    assert re.search(r"^password:\s+\S{39}$", out, re.M)
    assert re.search(r"^recovery key:\s+\S{39}$", out, re.M)
    run_cli(
        data_dir,
        "user",
        "add",
        "bob@example.test",
        "--password-stdin",
        stdin="quiet harbour lantern\n",
    )
    assert run_cli(data_dir, "user", "list").stdout.split() == [
        "alice@example.test",
        "bob@example.test",
    ]
    out = run_cli(
        data_dir, "alias", "add", "team@example.test", "alice@example.test", "x@remote.org"
    ).stdout
    assert out.strip() == "team@example.test -> alice@example.test, x@remote.org"
    assert "team@example.test" in run_cli(data_dir, "alias", "list").stdout
    run_cli(data_dir, "alias", "remove", "team@example.test")
    assert run_cli(data_dir, "alias", "list").stdout == ""


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["user", "add", "bad address"], None, "invalid"),
        (["user", "add", "ü@example.test"], None, "invalid local part"),
        (["user", "add", "x@unknown.test"], None, "unknown domain"),
        (["user", "add", "carol@example.test", "--password-stdin"], "short\n", "too short"),
        (["domain", "add", "example.test"], None, "already exists"),
        (["domain", "add", "not a domain"], None, "invalid domain"),
        (["alias", "add", "a@example.test", "ghost@example.test"], None, "not a user"),
        (["domain", "remove", "example.test"], None, "still has 1 users"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(
    data_dir: Path, args: list[str], stdin: str | None, message: str
) -> None:
    run_cli(data_dir, "domain", "add", "example.test")
    add_user(data_dir, "alice@example.test")
    before = (run_cli(data_dir, "user", "list").stdout, run_cli(data_dir, "alias", "list").stdout)
    result = run_cli(data_dir, *args, stdin=stdin, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    after = (run_cli(data_dir, "user", "list").stdout, run_cli(data_dir, "alias", "list").stdout)
    assert after == before
    assert run_cli(data_dir, "domain", "list").stdout.split() == ["example.test"]


def test_deliver_exit_codes_and_mailbox_ls(data_dir: Path) -> None:
    run_cli(data_dir, "domain", "add", "example.test")
    password = add_user(data_dir, "alice@example.test")
    ok = run_cli(
        data_dir,
        "deliver",
        "--to",
        "Alice+news@example.test",
        "--from",
        "s@remote.test",
        stdin=MESSAGE,
    )
    assert ok.returncode == 0
    unknown = run_cli(
        data_dir, "deliver", "--to", "nobody@example.test", stdin=MESSAGE, check=False
    )
    assert unknown.returncode == 67
    elsewhere = run_cli(data_dir, "deliver", "--to", "a@elsewhere.test", stdin=MESSAGE, check=False)
    assert elsewhere.returncode == 67
    listing = run_cli(
        data_dir, "mailbox", "ls", "alice@example.test", "--password-stdin", stdin=password + "\n"
    )
    assert listing.stdout.splitlines() == ["INBOX\t1\t-\tQuarterly report"]
    wrong = run_cli(
        data_dir,
        "mailbox",
        "ls",
        "alice@example.test",
        "--password-stdin",
        stdin="wrong\n",
        check=False,
    )
    assert wrong.returncode == 1 and "authentication failed" in wrong.stderr


def test_deliver_tempfails_when_the_store_cannot_write(data_dir: Path) -> None:
    run_cli(data_dir, "domain", "add", "example.test")
    add_user(data_dir, "alice@example.test")
    directory = Directory.open(f"sqlite:///{data_dir / 'directory.sqlite3'}")
    user = directory.get_user("alice@example.test")
    directory.close()
    assert user is not None
    # The spool's place is taken by a directory, so SQLite cannot open it: an I/O failure
    # that even root cannot write through. The MTA must keep the message and retry.
    (data_dir / "mailboxes" / f"{user.mailbox_id}.spool").mkdir(parents=True)
    result = run_cli(data_dir, "deliver", "--to", "alice@example.test", stdin=MESSAGE, check=False)
    assert result.returncode == 75, result.stderr
    assert "temporary failure" in result.stderr


def test_password_change_app_password_revoke_and_recovery(data_dir: Path) -> None:
    run_cli(data_dir, "domain", "add", "example.test")
    out = run_cli(data_dir, "user", "add", "alice@example.test").stdout
    password = re.search(r"^password:\s+(\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    recovery = re.search(r"^recovery key:\s+(\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    run_cli(data_dir, "deliver", "--to", "alice@example.test", stdin=MESSAGE)

    def ls(secret: str) -> int:
        return run_cli(
            data_dir,
            "mailbox",
            "ls",
            "alice@example.test",
            "--password-stdin",
            stdin=secret + "\n",
            check=False,
        ).returncode

    app = run_cli(
        data_dir,
        "app-password",
        "add",
        "alice@example.test",
        "--label",
        "phone",
        stdin=password + "\n",
    ).stdout.strip()
    assert ls(app) == 0
    assert (
        run_cli(data_dir, "app-password", "list", "alice@example.test")
        .stdout.split("\t")[1]
        .strip()
        == "phone"
    )
    run_cli(data_dir, "app-password", "revoke", "alice@example.test", "phone")
    assert ls(app) == 1  # a revoked secret opens nothing

    run_cli(
        data_dir,
        "user",
        "passwd",
        "alice@example.test",
        "--password-stdin",
        stdin=f"{password}\nnew long passphrase\n",
    )
    assert ls(password) == 1
    assert ls("new long passphrase") == 0
    # Lost password: the recovery key sets a new one, and the mail is still there.
    reset = run_cli(data_dir, "user", "passwd", "alice@example.test", stdin=recovery + "\n").stdout
    new = reset.split()[-1]
    listing = run_cli(
        data_dir, "mailbox", "ls", "alice@example.test", "--password-stdin", stdin=new + "\n"
    )
    assert "Quarterly report" in listing.stdout


def test_concurrent_deliveries_to_one_mailbox_all_succeed(data_dir: Path) -> None:
    """Several MTA delivery agents at once share the spool file: none may fail with busy."""
    import subprocess

    from conftest import mailfort_cmd

    run_cli(data_dir, "domain", "add", "example.test")
    password = add_user(data_dir, "alice@example.test")
    run_cli(data_dir, "alias", "add", "team@example.test", "alice@example.test")
    procs = [
        subprocess.Popen(
            [*mailfort_cmd(), "--data-dir", str(data_dir), "deliver", "--to", "team@example.test"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(12)
    ]
    for n, proc in enumerate(procs):
        assert proc.stdin is not None
        proc.stdin.write(MESSAGE.replace(b"Quarterly report", f"parallel {n}".encode()))
        proc.stdin.close()
    results = [
        (proc.wait(timeout=120), proc.stderr.read() if proc.stderr else b"") for proc in procs
    ]
    assert [code for code, _err in results] == [0] * 12, results
    listing = run_cli(
        data_dir, "mailbox", "ls", "alice@example.test", "--password-stdin", stdin=password + "\n"
    )
    assert sorted(line.split("\t")[3] for line in listing.stdout.splitlines()) == sorted(
        f"parallel {n}" for n in range(12)
    )
