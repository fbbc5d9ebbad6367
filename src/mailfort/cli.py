"""The `mailfort` command.

Every refusal is one line on stderr and a non-zero exit; secrets are read from stdin, never
from arguments (which other users can see in the process list).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mailfort import __version__

EX_OK = 0
EX_ERROR = 1
EX_USAGE = 64
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75

DEFAULT_DATA_DIR = "./var"


class CliError(Exception):
    def __init__(self, message: str, code: int = EX_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or os.environ.get("MAILFORT_DATA_DIR") or DEFAULT_DATA_DIR)


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from mailfort import config

    env = dict(os.environ)
    env["MAILFORT_DATA_DIR"] = str(_data_dir(args))
    try:
        return config.load(None, env)
    except config.ConfigError as exc:
        raise CliError(str(exc)) from exc


def _directory(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from mailfort.directory.service import Directory
    from mailfort.keys.server import ServerKey

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Directory.open(settings.directory_url, ServerKey.load_or_create(settings.data_dir))


def _read_lines(count: int, what: str) -> list[str]:
    lines = []
    for _ in range(count):
        line = sys.stdin.readline()
        if not line:
            raise CliError(f"expected {what} on standard input", EX_USAGE)
        lines.append(line.rstrip("\r\n"))
    return lines


# ---- domain -------------------------------------------------------------------------------


def cmd_domain(args: argparse.Namespace) -> int:
    d = _directory(args)
    if args.action == "add":
        print(d.add_domain(args.name))
    elif args.action == "list":
        for name in d.list_domains():
            print(name)
    elif args.action == "remove":
        d.remove_domain(args.name)
    elif args.action == "dns":
        from mailfort.directory.addresses import normalise_domain
        from mailfort.directory.dnsrecords import records

        keys = d.dkim_keys(args.name)
        for record in records(normalise_domain(args.name), _settings(args).hostname, keys):
            print(record.zone_line())
    elif args.action == "dkim-rotate":
        for key in d.rotate_dkim(args.name):
            print(f"{key.selector}\t{key.algorithm}\t{'active' if key.active else 'retired'}")
    elif args.action == "dns-rules":
        if args.state is not None:
            d.set_dns_rules(args.name, args.state == "on")
        print("on" if d.dns_rules_enabled(args.name) else "off")
    elif args.action == "webhook-secret":
        # The receiver needs it to check signatures; shown only to whoever runs the CLI.
        print(d.webhook_secret(args.name, rotate=args.rotate).hex())
    return EX_OK


# ---- user ---------------------------------------------------------------------------------


def cmd_user(args: argparse.Namespace) -> int:
    d = _directory(args)
    if args.action == "add":
        password = _read_lines(1, "a password")[0] if args.password_stdin else None
        new = d.add_user(args.address, password)
        print(f"user:         {new.user.address}")
        if new.password is not None:
            print(f"password:     {new.password}")
        print(f"recovery key: {new.recovery_key}")
        print("Keep the recovery key offline: it is the only way back if the password is lost.")
    elif args.action == "list":
        for user in d.list_users(args.domain):
            print(user.address)
    elif args.action == "passwd":
        if args.password_stdin:
            current, new_password = _read_lines(2, "the current secret and the new password")
        else:
            current, new_password = _read_lines(1, "the current secret")[0], None
        password = d.change_password(args.address, current, new_password)
        if new_password is None:
            print(f"password: {password}")
    elif args.action == "remove":
        from mailfort.store.service import MailStore

        user = d.remove_user(args.address)
        store = MailStore(_data_dir(args))
        for path in (store.mailbox_path(user.mailbox_id), store.spool_path(user.mailbox_id)):
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
    return EX_OK


# ---- alias --------------------------------------------------------------------------------


def cmd_alias(args: argparse.Namespace) -> int:
    d = _directory(args)
    if args.action == "add":
        alias = d.add_alias(args.alias, args.targets)
        print(f"{alias.address} -> {', '.join(alias.targets)}")
    elif args.action == "list":
        for alias in d.list_aliases(args.domain):
            print(f"{alias.address} -> {', '.join(alias.targets)}")
    elif args.action == "remove":
        d.remove_alias(args.alias)
    return EX_OK


# ---- app passwords ------------------------------------------------------------------------


def cmd_app_password(args: argparse.Namespace) -> int:
    d = _directory(args)
    if args.action == "add":
        current = _read_lines(1, "the account password")[0]
        print(d.add_app_password(args.address, current, args.label))
    elif args.action == "list":
        for app in d.list_app_passwords(args.address):
            print(f"{app.id}\t{app.label}")
    elif args.action == "revoke":
        app = d.revoke_app_password(args.address, args.which)
        print(f"revoked {app.id} ({app.label})")
    return EX_OK


# ---- delivery and mailbox -----------------------------------------------------------------


def cmd_deliver(args: argparse.Namespace) -> int:
    from mailfort import delivery
    from mailfort.store.service import MailStore, QuotaExceeded

    raw = sys.stdin.buffer.read()
    if not raw.strip():
        raise CliError("empty message on standard input", EX_USAGE)
    try:
        d = _directory(args)
        targets = delivery.local_targets(d, args.to)
    except (delivery.UnknownRecipient, delivery.NotHosted) as exc:
        raise CliError(f"unknown recipient: {exc}", EX_NOUSER) from exc
    except delivery.ForwardingUnavailable as exc:
        raise CliError(
            f"{exc} forwards outside: the MX relays it, not the LDA", EX_UNAVAILABLE
        ) from exc
    store = MailStore(_data_dir(args), quota=_settings(args).quota())
    try:
        delivery.deliver_local(store, targets, delivery.with_return_path(raw, args.mail_from))
    except QuotaExceeded as exc:
        # Permanent, as Dovecot's LDA by default: a temporary failure would leave the sender
        # without news for days. No "mailfort:" prefix: pipe(8) reads the status code first.
        print(delivery.quota_refusal(exc), file=sys.stderr)
        return delivery.QUOTA_EXIT_CODE
    except Exception as exc:
        # Exit 0 only once the message is durable; anything else asks the MTA to retry.
        raise CliError(f"temporary failure: {type(exc).__name__}", EX_TEMPFAIL) from exc
    finally:
        store.close()
    return EX_OK


def cmd_mailbox(args: argparse.Namespace) -> int:
    from mailfort.directory.service import AuthFailed
    from mailfort.store.service import MailStore

    d = _directory(args)
    secret = _read_lines(1, "the account password")[0] if args.password_stdin else None
    if secret is None:
        import getpass

        secret = getpass.getpass("password: ")
    try:
        unlocked = d.unlock(args.address, secret)
    except AuthFailed as exc:
        raise CliError("authentication failed: wrong address or secret") from exc
    store = MailStore(_data_dir(args))
    mailbox = store.open(unlocked.user.mailbox_id, unlocked.secrets)
    try:
        for folder in mailbox.folders():
            for msg in mailbox.messages(folder.name):
                flags = " ".join(sorted(msg.flags)) or "-"
                print(f"{folder.name}\t{msg.uid}\t{flags}\t{msg.meta.subject or ''}")
    finally:
        store.release(unlocked.user.mailbox_id)
        store.close()
    return EX_OK


# ---- services -----------------------------------------------------------------------------


def cmd_queue(args: argparse.Namespace) -> int:
    from mailfort.keys.server import ServerKey
    from mailfort.outbound.queue import Queue

    data_dir = _data_dir(args)
    queue = Queue(data_dir, ServerKey.load_or_create(data_dir))
    try:
        if args.action == "flush":
            print(f"{queue.flush()} recipients due now")
        else:
            print(f"{queue.pending_count()} recipients waiting")
    finally:
        queue.close()
    return EX_OK


def cmd_dev(args: argparse.Namespace) -> int:
    from mailfort import app

    return app.run_dev(_data_dir(args), args.dns, args.workers)


def cmd_serve(args: argparse.Namespace) -> int:
    from mailfort import app, config

    try:
        settings = config.load(Path(args.config))
    except config.ConfigError as exc:
        raise CliError(f"configuration: {exc}") from exc
    return app.run(settings, args.workers or os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailfort", description="A privacy-first mail service.")
    p.add_argument("--version", action="version", version=f"mailfort {__version__}")
    p.add_argument("--data-dir", help="data directory (env MAILFORT_DATA_DIR; default ./var)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, fn: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(func=fn)
        # Accepted after the command too, so `mailfort dev --data-dir X` works.
        sp.add_argument("--data-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    dev = command("dev", cmd_dev, "run every listener on loopback with a demo domain and user")
    dev.add_argument("--dns", metavar="HOST:PORT", help="send every DNS query to this server")
    dev.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve = command("serve", cmd_serve, "run the service from a TOML configuration")
    serve.add_argument("--config", required=True, metavar="FILE")
    serve.add_argument("--workers", type=int, help="worker processes (default: one per core)")

    dom = command("domain", cmd_domain, "hosted domains").add_subparsers(
        dest="action", required=True
    )
    dom.add_parser("add").add_argument("name")
    dom.add_parser("list")
    dom.add_parser("remove").add_argument("name")
    dom.add_parser("dns", help="print the zone records the domain needs").add_argument("name")
    dom.add_parser("dkim-rotate", help="new DKIM keys; the old stay published").add_argument("name")
    rules = dom.add_parser(
        "dns-rules", help="let the domain's forward-email= TXT records route mail (on/off)"
    )
    rules.add_argument("name")
    rules.add_argument("state", nargs="?", choices=["on", "off"])
    hook = dom.add_parser("webhook-secret", help="print the key that signs webhook posts")
    hook.add_argument("name")
    hook.add_argument("--rotate", action="store_true", help="replace it first")

    usr = command("user", cmd_user, "mail accounts").add_subparsers(dest="action", required=True)
    add = usr.add_parser("add", help="create a user; prints a password and a recovery key once")
    add.add_argument("address")
    add.add_argument("--password-stdin", action="store_true", help="choose the password")
    usr.add_parser("list").add_argument("domain", nargs="?")
    pw = usr.add_parser(
        "passwd",
        help="change the password; stdin: the current secret (password or recovery key), "
        "then with --password-stdin the new password",
    )
    pw.add_argument("address")
    pw.add_argument("--password-stdin", action="store_true")
    usr.add_parser("remove").add_argument("address")

    ali = command("alias", cmd_alias, "aliases and forwards").add_subparsers(
        dest="action", required=True
    )
    aadd = ali.add_parser("add", help="ALIAS TARGET...: '*@domain' is the catch-all")
    aadd.add_argument("alias")
    aadd.add_argument("targets", nargs="+")
    ali.add_parser("list").add_argument("domain", nargs="?")
    ali.add_parser("remove").add_argument("alias")

    app = command("app-password", cmd_app_password, "passwords for mail clients")
    apps = app.add_subparsers(dest="action", required=True)
    apadd = apps.add_parser("add", help="stdin: the account password")
    apadd.add_argument("address")
    apadd.add_argument("--label", default="mail client")
    apps.add_parser("list").add_argument("address")
    rev = apps.add_parser("revoke")
    rev.add_argument("address")
    rev.add_argument("which", help="id or label")

    que = command("queue", cmd_queue, "the outbound queue").add_subparsers(
        dest="action", required=True
    )
    que.add_parser("status", help="how many recipients wait")
    que.add_parser("flush", help="retry every waiting recipient now")

    dl = command("deliver", cmd_deliver, "local delivery agent: the message on stdin")
    dl.add_argument("--to", required=True)
    dl.add_argument("--from", dest="mail_from")

    mbx = command("mailbox", cmd_mailbox, "read a mailbox").add_subparsers(
        dest="action", required=True
    )
    ls = mbx.add_parser("ls", help="list folder, UID, flags and subject")
    ls.add_argument("address")
    ls.add_argument("--password-stdin", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from mailfort.directory.addresses import AddressError
    from mailfort.directory.passwords import WeakPassword
    from mailfort.directory.service import AuthFailed, DirectoryError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"mailfort: {exc}", file=sys.stderr)
        return exc.code
    except (DirectoryError, AddressError, WeakPassword) as exc:
        print(f"mailfort: {exc}", file=sys.stderr)
        return EX_ERROR
    except AuthFailed:
        print("mailfort: authentication failed: wrong address or secret", file=sys.stderr)
        return EX_ERROR
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # Disk full, permissions, a locked database: the sender should try again later.
        print(f"mailfort: temporary failure: {exc.strerror or exc}", file=sys.stderr)
        return EX_TEMPFAIL if args.command == "deliver" else EX_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
