"""Service wiring: build the directory, store and listeners from settings and run them.

`mailfort dev` is the embedded default: everything under one data directory, loopback
ports, a self-signed certificate, and a demo account it prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailfort import config, delivery, tls
from mailfort.directory.service import Directory
from mailfort.dns import Nameserver, Resolver
from mailfort.imap import server as mail_access
from mailfort.keys.server import ServerKey
from mailfort.outbound import policy as outbound_policy
from mailfort.outbound.engine import Engine
from mailfort.outbound.queue import Queue
from mailfort.relay.memo import SharedMemo
from mailfort.smtp import conncount
from mailfort.smtp import listeners as smtp_listeners
from mailfort.smtp.limits import SendingLimits, SendingPolicy
from mailfort.store.service import MailStore

DEMO_DOMAIN = "example.test"
DEMO_USER = f"demo@{DEMO_DOMAIN}"


@dataclass
class Services:
    """What listeners are built from; one instance per worker process."""

    settings: config.Settings
    directory: Directory
    store: MailStore
    resolver: Resolver
    queue: Queue
    limits: SendingLimits
    worker_index: int = 0
    # Shared by every worker process (created before the fork): forwarding's retry and SRS
    # records, which must hold whichever worker the next connection lands on.
    memo: SharedMemo = field(default_factory=SharedMemo)
    engine: Engine | None = None  # outbound delivery: worker 0 only, so none twice
    servers: list[asyncio.AbstractServer] = field(default_factory=list)

    def wake_engine(self) -> None:
        if self.engine is not None:
            self.engine.wake()

    def close(self) -> None:
        self.queue.close()
        self.store.close()
        self.directory.close()


# A listener factory starts its servers for the named port and returns the bound port.
ListenerFactory = Callable[[Services, str, int], Awaitable[int]]
LISTENER_FACTORIES: dict[str, ListenerFactory] = {}
LISTENER_FACTORIES.update(smtp_listeners.listeners())
LISTENER_FACTORIES.update(mail_access.listeners())  # imap, imaps, pop3, pop3s


def build(
    settings: config.Settings, worker_index: int = 0, memo: SharedMemo | None = None
) -> Services:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(settings.data_dir, 0o700)
    assert settings.tls_cert is not None and settings.tls_key is not None
    tls.ensure_self_signed(settings.tls_cert, settings.tls_key, settings.hostname)
    server_key = ServerKey.load_or_create(settings.data_dir)
    return Services(
        settings=settings,
        directory=Directory.open(settings.directory_url, server_key),
        store=MailStore(settings.data_dir, quota=settings.quota()),
        resolver=Resolver(settings.nameservers, cache=True),
        queue=Queue(settings.data_dir, server_key),
        limits=SendingLimits(SendingPolicy(**settings.sending_limits)),
        worker_index=worker_index,
        memo=memo if memo is not None else SharedMemo(),
    )


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def _serve(services: Services, ready: Callable[[dict[str, int]], None]) -> None:
    bound: dict[str, int] = {}
    for name, factory in LISTENER_FACTORIES.items():
        port = services.settings.ports.get(name)
        if port is None:
            continue
        bound[name] = await factory(services, services.settings.listen_host, port)
    if services.worker_index == 0:
        # MTA-STS, DANE and TLS-RPT state lives under DATA/queue/ (see outbound.policy).
        tls_policy, tls_reports = outbound_policy.build(
            services.settings, services.resolver, services.queue
        )
        services.engine = Engine(
            services.queue,
            services.resolver,
            functools.partial(
                delivery.deliver_bounce, services.directory, services.store, services.queue
            ),
            hostname=services.settings.hostname,
            port=services.settings.outbound_port,
            tls=tls_policy,
            tls_reports=tls_reports,
        )
        services.engine.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ready(bound)  # only now: a signal from here on stops cleanly
    await stop.wait()
    for server in services.servers:
        server.close()
    for server in services.servers:
        await server.wait_closed()
    if services.engine is not None:
        await services.engine.stop()


def _run_loop(coro: Awaitable[None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def _run_one(
    settings: config.Settings,
    ready: Callable[[dict[str, int]], None],
    worker_index: int = 0,
    memo: SharedMemo | None = None,
) -> None:
    services = build(settings, worker_index, memo)
    try:
        _run_loop(_serve(services, ready))
    finally:
        services.close()


def _run_workers(
    settings: config.Settings, workers: int, ready: Callable[[dict[str, int]], None]
) -> int:
    """One process per core on the same ports (SO_REUSEPORT): Python runs one core per
    process, and the kernel spreads connections across the workers' listening sockets.

    The parent only forks, forwards SIGTERM/SIGINT and reaps; each worker builds its own
    directory engine and store after the fork (neither SQLite handles nor threads survive
    a fork safely).
    """
    if workers <= 1:
        _run_one(settings, ready)
        return 0
    build(settings).close()  # migrations, keys and certificate once, before the fork
    conncount.create_node_table(workers)  # shared memory: the MX per-IP cap is node-wide
    memo = SharedMemo()
    read_end, write_end = os.pipe()
    children: list[int] = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(read_end)
            code = 0

            def report(ports: dict[str, int]) -> None:
                os.write(write_end, json.dumps(ports).encode() + b"\n")

            try:
                _run_one(settings, report, index, memo)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        children.append(pid)
    os.close(write_end)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    with os.fdopen(read_end, "rb") as pipe:
        lines = [pipe.readline() for _ in range(workers)]
    if all(lines):
        ready(json.loads(lines[0]))
    else:
        forward(signal.SIGTERM, None)
    failed = 0
    for child in children:
        _pid, status = os.waitpid(child, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    return 1 if failed or not all(lines) else 0


def run(settings: config.Settings, workers: int) -> int:
    return _run_workers(
        settings, workers, lambda ports: print(json.dumps({"ports": ports}), flush=True)
    )


def run_dev(data_dir: Path, dns: str | None, workers: int = 1) -> int:
    # Environment overrides apply in dev too (MAILFORT_TRUSTED_FORWARDERS, MAILFORT_HOSTNAME...).
    env = {"MAILFORT_HOSTNAME": "localhost", **os.environ, "MAILFORT_DATA_DIR": str(data_dir)}
    settings = config.load(None, env)
    if dns:
        try:
            settings.nameservers = [Nameserver.parse(dns)]
        except ValueError as exc:
            raise SystemExit(f"mailfort: --dns: {exc}") from exc
    settings.ports = {name: free_port(settings.listen_host) for name in LISTENER_FACTORIES}
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = Directory.open(settings.directory_url, ServerKey.load_or_create(data_dir))
    password = _ensure_demo(directory, data_dir)
    directory.close()

    def ready(ports: dict[str, int]) -> None:
        info = {"ports": ports, "user": DEMO_USER, "password": password}
        path = data_dir / "dev.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh, indent=2)
        print(f"mailfort dev: data in {data_dir}")
        for name, port in sorted(ports.items()):
            print(f"  {name:<12} {settings.listen_host}:{port}")
        print(f"  user         {DEMO_USER}")
        print(f"  password     {password}")
        print(f"  (also in {path}; Ctrl-C stops)", flush=True)

    return _run_workers(settings, workers, ready)


def _ensure_demo(directory: Directory, data_dir: Path) -> str:
    """The demo account survives restarts: its password is kept in dev.json."""
    known = data_dir / "dev.json"
    if directory.get_user(DEMO_USER) is not None and known.exists():
        return str(json.loads(known.read_text())["password"])
    if DEMO_DOMAIN not in directory.list_domains():
        directory.add_domain(DEMO_DOMAIN)
    if directory.get_user(DEMO_USER) is not None:
        directory.remove_user(DEMO_USER)
    new = directory.add_user(DEMO_USER)
    assert new.password is not None
    return new.password
