"""`mailfort dev` and `mailfort serve` as an operator starts and stops them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mailfort import config

from conftest import mailfort_cmd, run_cli


def test_dev_prints_demo_account_writes_dev_json_and_stops_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "devdata"
    proc = subprocess.Popen(
        [*mailfort_cmd(), "dev", "--data-dir", str(data_dir), "--dns", "127.0.0.1:5353"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (data_dir / "dev.json").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "mailfort dev did not become ready"
            time.sleep(0.05)
        time.sleep(0.2)
        info = json.loads((data_dir / "dev.json").read_text())
        assert info["user"] == "demo@example.test" and len(info["password"]) >= 12
        assert isinstance(info["ports"], dict)
        assert (data_dir / "dev.json").stat().st_mode & 0o077 == 0
        assert (data_dir / "tls" / "cert.pem").exists()
        # The CLI works on the running service's data.
        assert run_cli(data_dir, "user", "list").stdout.split() == ["demo@example.test"]
        delivered = run_cli(
            data_dir, "deliver", "--to", "demo@example.test", stdin=b"Subject: hi demo\r\n\r\nx\r\n"
        )
        assert delivered.returncode == 0
        listing = run_cli(
            data_dir,
            "mailbox",
            "ls",
            "demo@example.test",
            "--password-stdin",
            stdin=info["password"] + "\n",
        )
        assert "hi demo" in listing.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert info["password"] in out and "demo@example.test" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dev_restarts_with_the_same_demo_account(tmp_path: Path) -> None:
    data_dir = tmp_path / "devdata"
    passwords = []
    for _ in range(2):
        proc = subprocess.Popen(
            [*mailfort_cmd(), "--data-dir", str(data_dir), "dev"], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # ready once it has printed the account
            if "Ctrl-C stops" in line:
                break
        passwords.append(json.loads((data_dir / "dev.json").read_text())["password"])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert passwords[0] == passwords[1]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('data_dir = "/tmp/x"\nbogus = 1\n', "unknown setting 'bogus'"),
        ('data_dir = "/tmp/x"\n[listen]\nimap = "143"\n', "'listen.imap' must be a int"),
        ('data_dir = "/tmp/x"\n[listen]\nimap = 70000\n', "'listen.imap' must be a port number"),
        ('data_dir = "/tmp/x"\n[dns]\nnameservers = ["1.2.3.4:0"]\n', "'dns.nameservers'"),
        ('data_dir = "/tmp/x"\n[nope]\nx = 1\n', "unknown section [nope]"),
        ("hostname = 'mx.example.org'\n", "'data_dir' is required"),
        ("data_dir = \n", "Invalid"),
        ('data_dir = "/tmp/x"\n[quota]\nbytes = -5\n', "'quota.bytes' must not be negative"),
        ('data_dir = "/tmp/x"\n[forward]\nallow_private_webhooks = 1\n', "true or false"),
    ],
)
def test_serve_refuses_bad_config_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "mailfort.toml"
    path.write_text(toml)
    with pytest.raises(config.ConfigError, match=None) as err:
        config.load(path, env={})
    assert message.lower() in str(err.value).lower()
    result = subprocess.run(
        [*mailfort_cmd(), "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message.lower() in result.stderr.lower()


def test_env_overrides_config(tmp_path: Path) -> None:
    path = tmp_path / "mailfort.toml"
    path.write_text(
        'data_dir = "/srv/mail"\n[dns]\nnameservers = ["192.0.2.1"]\n[listen]\nsmtp = 2525\n'
    )
    settings = config.load(
        path, env={"MAILFORT_DNS": "127.0.0.1:5353", "MAILFORT_DATA_DIR": str(tmp_path)}
    )
    assert settings.data_dir == tmp_path
    assert [(n.host, n.port) for n in settings.nameservers] == [("127.0.0.1", 5353)]
    assert settings.ports == {"smtp": 2525}
    assert settings.directory_url == f"sqlite:///{tmp_path / 'directory.sqlite3'}"


def test_quota_from_toml_and_env(tmp_path: Path) -> None:
    path = tmp_path / "mailfort.toml"
    path.write_text('data_dir = "/srv/mail"\n[quota]\nbytes = 1000000\nmessages = 0\n')
    settings = config.load(path, env={})
    assert (settings.quota().storage, settings.quota().messages) == (1_000_000, None)  # 0: none
    settings = config.load(path, env={"MAILFORT_QUOTA_BYTES": "2000"})
    assert settings.quota().storage == 2000


def test_dev_workers_share_the_smtp_port_and_stop_together(tmp_path: Path) -> None:
    import smtplib

    from dnsserver import DNSServer

    dns = DNSServer()
    dns.set_zone({"sender.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all")]})
    data_dir = tmp_path / "devdata"
    proc = subprocess.Popen(
        [
            *mailfort_cmd(),
            "--data-dir",
            str(data_dir),
            "dev",
            "--workers",
            "2",
            "--dns",
            f"127.0.0.1:{dns.port}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Ctrl-C stops" in line:
                break
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2  # two workers under one supervisor
        info = json.loads((data_dir / "dev.json").read_text())
        for n in range(12):  # new connections spread over both workers' sockets
            with smtplib.SMTP(
                "127.0.0.1", info["ports"]["smtp"], local_hostname="sender.test"
            ) as c:
                c.sendmail(
                    "a@sender.test", ["demo@example.test"], f"Subject: w{n}\r\n\r\nx\r\n".encode()
                )
        listing = run_cli(
            data_dir,
            "mailbox",
            "ls",
            "demo@example.test",
            "--password-stdin",
            stdin=info["password"] + "\n",
        )
        assert sorted(line.split("\t")[3] for line in listing.stdout.splitlines()) == sorted(
            f"w{n}" for n in range(12)
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for child in children:
            assert (
                not Path(f"/proc/{child}").exists()
                or "zombie" in Path(f"/proc/{child}/status").read_text()
            )
    finally:
        if proc.poll() is None:
            proc.kill()
        dns.close()
