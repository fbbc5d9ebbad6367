"""Shared fixtures. Tests use real parts: files on disk, SQLite3MC, PostgreSQL, subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# Argon2id at its production cost (64 MiB, ~150 ms) would dominate the suite; the cost is a
# setting stored in each slot, so a cheaper one exercises exactly the same code.
os.environ.setdefault("MAILFORT_ARGON2_MEMORY_KIB", "8192")
os.environ.setdefault("MAILFORT_ARGON2_TIME_COST", "1")

pytest_plugins = ["conftest_dns"]

IN_CI = os.environ.get("CI") == "true"
REPO = Path(__file__).resolve().parents[1]


def require_tool(name: str) -> str:
    """The path of a tool the test needs; skip locally without it, fail in CI."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"required tool {name!r} is not installed (CI must install it)")
        pytest.skip(f"needs {name}")
    return path


def mailfort_cmd() -> list[str]:
    return [sys.executable, "-m", "mailfort.cli"]


def run_cli(
    data_dir: Path, *args: str, stdin: bytes | str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [*mailfort_cmd(), "--data-dir", str(data_dir), *args],
        input=data,
        capture_output=True,
        timeout=120,
        check=False,
    )
    result = subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mailfort {' '.join(args)} failed ({proc.returncode}): {result.stderr}"
        )
    return result


def start_dev(
    data_dir: Path,
    dns_port: int | None = None,
    *,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`mailfort dev` on ``data_dir`` (resolving through the test DNS server on ``dns_port``
    if given); returns the process and its dev.json (ports, demo account). ``args``: more
    `dev` arguments (``--workers 2``).

    Its stderr goes to a file beside the data dir: an unread pipe would block the server.
    """
    log_path = data_dir.parent / "mailfort.stderr"
    with log_path.open("a") as log:
        proc = subprocess.Popen(
            [*mailfort_cmd(), "--data-dir", str(data_dir), "dev", *args,
             *(["--dns", f"127.0.0.1:{dns_port}"] if dns_port is not None else [])],
            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ctrl-C stops" in line:
            break
    else:
        proc.wait()
        raise AssertionError(f"mailfort dev did not start: {log_path.read_text()}")
    return proc, json.loads((data_dir / "dev.json").read_text())


def start_outbound_dev(
    data_dir: Path, dns_port: int, smtp_port: int, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`mailfort dev` whose outbound delivery and forwarding go to ``smtp_port``."""
    env = {"MAILFORT_OUTBOUND_PORT": str(smtp_port), "MAILFORT_HOSTNAME": "mx.example.test",
           **(env or {})}  # fmt: skip
    return start_dev(data_dir, dns_port, env=env)


def stop_dev(proc: subprocess.Popen[str]) -> int | None:
    """SIGTERM, as an operator stops it; killed if not gone in 30 s. The exit code, or
    None when it had to be killed."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "var"
    d.mkdir()
    yield d
