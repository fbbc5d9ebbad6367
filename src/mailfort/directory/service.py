"""The account directory: domains, users, aliases and key slots, on SQLite or PostgreSQL.

Every change that writes more than one row runs in one transaction, so a failure leaves
nothing half written. Secrets never reach this module's tables: only key slots (verifiers
and wrapped keys) and public delivery keys.
"""

from __future__ import annotations

import contextlib
import enum
import secrets as pysecrets
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from mailfort.directory import dkimkeys
from mailfort.directory import schema as t
from mailfort.directory.addresses import (
    Address,
    AddressError,
    normalise_domain,
    parse_local_address,
    parse_remote_address,
    split_plus,
)
from mailfort.directory.passwords import check_password_strength
from mailfort.keys.secrets import MailboxSecrets, PublicKeys
from mailfort.keys.server import ServerKey
from mailfort.keys.slots import (
    KeySlot,
    SlotKind,
    WrongSecret,
    create_slot,
    generate_secret,
    open_slot,
    verify_slot,
)

MAX_ALIAS_TARGETS = 10


POSTMASTER = "postmaster"  # RFC 5321 §4.5.1, case-insensitive


class DirectoryError(Exception):
    """A refused directory change; the message is one clear line for the operator."""


class AuthFailed(Exception):
    """Unknown account or wrong secret: the two are deliberately indistinguishable."""


@dataclass(frozen=True)
class User:
    id: int
    address: Address
    mailbox_id: str
    public_keys: PublicKeys


@dataclass(frozen=True)
class NewUser:
    user: User
    password: str | None  # None when the operator chose it
    recovery_key: str


@dataclass(frozen=True)
class AppPassword:
    id: int
    label: str
    created_at: int


@dataclass(frozen=True)
class Alias:
    address: str
    targets: tuple[str, ...]


class RouteKind(enum.Enum):
    LOCAL = "local"
    UNKNOWN_USER = "unknown-user"
    NOT_HOSTED = "not-hosted"


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    users: tuple[User, ...] = ()
    forwards: tuple[str, ...] = ()  # addresses outside our domains
    tag: str | None = None  # the plus-tag, which travels with the message
    webhooks: tuple[str, ...] = ()  # https:// URLs that receive the message as JSON
    # UNKNOWN_USER in a domain whose DNS TXT forwarding rules the operator enabled: the
    # caller looks the rules up (they live in DNS, not here).
    dns_rules: bool = False


@dataclass(frozen=True)
class Unlocked:
    user: User
    secrets: MailboxSecrets
    slot_kind: SlotKind


def _now() -> int:
    return int(time.time())


def address_owned(owned: set[str], address: str) -> bool:
    """Plus-tags and case do not matter: ``Alice+news@Example.test`` is alice's."""
    local, _, domain = address.strip().rpartition("@")
    try:
        domain = normalise_domain(domain)
    except AddressError:
        return False
    base, _tag = split_plus(local.lower())
    return f"{base}@{domain}" in owned


def webhook_target(url: str) -> str:
    """An alias target that is a webhook: https only, a host, no credentials in the URL."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme.lower() != "https":
        raise DirectoryError(f"webhook target {url!r} must use https://")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise DirectoryError(f"invalid webhook target {url!r} (needs a host, no user:password)")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise DirectoryError(f"invalid webhook target {url!r}: {exc}") from exc
    if any(c.isspace() or ord(c) < 0x20 for c in url.strip()):
        raise DirectoryError(f"invalid webhook target {url!r}")
    return urllib.parse.urlunsplit(
        ("https", parts.netloc.lower(), parts.path or "/", parts.query, "")
    )


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: object, _record: object) -> None:
            cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


@dataclass(frozen=True)
class DkimKey:
    selector: str
    algorithm: str
    public_b64: str
    active: bool


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str
    private: bytes


class Directory:
    def __init__(self, engine: sa.Engine, server_key: ServerKey | None = None) -> None:
        self.engine = engine
        # Without the server key the directory still routes and authenticates, but cannot
        # create or use DKIM keys.
        self.server_key = server_key
        t.migrate(engine)
        self._changes = 0  # bumped after every write transaction made through this object
        self._watch_lock = threading.Lock()
        self._watch: sqlite3.Connection | None = None
        self._watch_path: str | None = None
        if engine.dialect.name == "sqlite":
            path = engine.url.database
            if path and path != ":memory:" and not path.startswith("file:"):
                self._watch_path = path

    @classmethod
    def open(cls, url: str, server_key: ServerKey | None = None) -> Directory:
        return cls(make_engine(url), server_key)

    def close(self) -> None:
        with self._watch_lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
        self.engine.dispose()

    # ---- change tracking -----------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A write transaction; the change counter moves once it has ended."""
        try:
            with self.engine.begin() as conn:
                yield conn
        finally:
            self._changes += 1

    def change_marker(self) -> Hashable | None:
        """A value that differs after any committed change to the directory, or None.

        Cheap enough to call per SMTP command (a few µs). It combines this object's own
        write counter with SQLite's ``PRAGMA data_version`` read on a private connection,
        which moves whenever any other connection, in this process or another (``mailfort
        user add`` and ``remove`` run as separate processes), commits to the file. Read it
        *before* a lookup and file the result under it: a change committed after the read
        then shows as a new marker. None means no such marker is available (PostgreSQL, an
        in-memory or URI database, an unreadable file): do not cache.
        """
        if self._watch_path is None:
            return None
        with self._watch_lock:
            try:
                if self._watch is None:
                    # timeout 0: never block the event loop on a lock; no marker instead.
                    self._watch = sqlite3.connect(
                        f"file:{urllib.parse.quote(self._watch_path)}?mode=rw",
                        uri=True,
                        timeout=0,
                        isolation_level=None,
                        check_same_thread=False,
                    )
                # fetchall: step the statement to its end so no read transaction stays open.
                version = self._watch.execute("PRAGMA data_version").fetchall()[0][0]
            except sqlite3.Error:
                return None
        return (self._changes, version)

    # ---- domains -------------------------------------------------------------------------

    def add_domain(self, name: str) -> str:
        """Add a hosted domain with a fresh Ed25519 and RSA-2048 DKIM pair.

        A directory opened without the server key (tools that only route or authenticate)
        adds the domain without keys; `rotate_dkim` creates them later.
        """
        domain = self._domain_name(name)
        keys = self._new_dkim_pair(set()) if self.server_key is not None else []
        try:
            with self._write() as conn:
                domain_id = conn.execute(
                    t.domains.insert().values(name=domain, created_at=_now())
                ).inserted_primary_key[0]  # type: ignore[index]
                self._insert_dkim(conn, domain_id, domain, keys)
        except IntegrityError as exc:
            raise DirectoryError(f"domain {domain} already exists") from exc
        return domain

    # ---- DKIM keys ------------------------------------------------------------------------

    def _new_dkim_pair(self, taken: set[str]) -> list[dkimkeys.NewKey]:
        if self.server_key is None:
            raise DirectoryError("DKIM keys need the server key (open the directory with it)")
        out = []
        for algorithm in dkimkeys.ALGORITHMS:
            selector = dkimkeys.selector_for(algorithm, taken)
            taken.add(selector)
            out.append(dkimkeys.generate(algorithm, selector))
        return out

    def _insert_dkim(
        self, conn: sa.Connection, domain_id: int, domain: str, keys: list[dkimkeys.NewKey]
    ) -> None:
        for key in keys:
            assert self.server_key is not None  # keys exist only when it does
            aad = f"{domain}|{key.selector}".encode()
            conn.execute(
                t.dkim_keys.insert().values(
                    domain_id=domain_id,
                    selector=key.selector,
                    algorithm=key.algorithm,
                    private_sealed=self.server_key.seal(b"dkim", key.private, aad),
                    public_key=key.public_b64,
                    created_at=_now(),
                )
            )

    def dkim_keys(self, domain: str) -> list[DkimKey]:
        """Every published key of the domain, active and retired (retired stay in DNS)."""
        name = self._domain_name(domain)
        with self.engine.connect() as conn:
            domain_id = self._domain_id(conn, name)
            rows = conn.execute(
                sa.select(t.dkim_keys)
                .where(t.dkim_keys.c.domain_id == domain_id)
                .order_by(t.dkim_keys.c.id)
            )
            return [
                DkimKey(r.selector, r.algorithm, r.public_key, r.retired_at is None) for r in rows
            ]

    def signing_keys(self, domain: str) -> list[SigningKey]:
        """The active private keys, unsealed: Ed25519 first (RFC 8463 §3 dual signing)."""
        if self.server_key is None:
            raise DirectoryError("DKIM signing needs the server key")
        name = self._domain_name(domain)
        with self.engine.connect() as conn:
            domain_id = self._domain_id(conn, name)
            rows = conn.execute(
                sa.select(t.dkim_keys).where(
                    (t.dkim_keys.c.domain_id == domain_id) & t.dkim_keys.c.retired_at.is_(None)
                )
            ).all()
        keys = [
            SigningKey(
                name,
                r.selector,
                r.algorithm,
                self.server_key.open(b"dkim", r.private_sealed, f"{name}|{r.selector}".encode()),
            )
            for r in rows
        ]
        return sorted(keys, key=lambda k: k.algorithm != "ed25519")

    def rotate_dkim(self, domain: str) -> list[DkimKey]:
        """New active pair; the old pair is retired but stays published."""
        name = self._domain_name(domain)
        with self.engine.connect() as conn:
            domain_id = self._domain_id(conn, name)
            taken = set(
                conn.execute(
                    sa.select(t.dkim_keys.c.selector).where(t.dkim_keys.c.domain_id == domain_id)
                ).scalars()
            )
        keys = self._new_dkim_pair(taken)
        with self._write() as conn:
            conn.execute(
                t.dkim_keys.update()
                .where((t.dkim_keys.c.domain_id == domain_id) & t.dkim_keys.c.retired_at.is_(None))
                .values(retired_at=_now())
            )
            self._insert_dkim(conn, domain_id, name, keys)
        return self.dkim_keys(name)

    def list_domains(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(t.domains.c.name).order_by("name")).scalars())

    def remove_domain(self, name: str) -> None:
        domain = self._domain_name(name)
        with self._write() as conn:
            domain_id = self._domain_id(conn, domain)
            for table, what in ((t.users, "users"), (t.aliases, "aliases")):
                count = conn.execute(
                    sa.select(sa.func.count()).where(table.c.domain_id == domain_id)
                ).scalar_one()
                if count:
                    raise DirectoryError(
                        f"domain {domain} still has {count} {what}; remove them first"
                    )
            conn.execute(t.dkim_keys.delete().where(t.dkim_keys.c.domain_id == domain_id))
            conn.execute(
                t.domain_forwarding.delete().where(t.domain_forwarding.c.domain_id == domain_id)
            )
            conn.execute(t.domains.delete().where(t.domains.c.id == domain_id))

    # ---- users ---------------------------------------------------------------------------

    def add_user(self, address: str, password: str | None = None) -> NewUser:
        addr = self._local(address)
        generated = password is None
        if password is None:
            password = generate_secret()
        else:
            check_password_strength(password, addr.local)
        recovery = generate_secret()
        mailbox_id = pysecrets.token_hex(16)
        secrets = MailboxSecrets.generate()
        owner = mailbox_id.encode()
        # Derive slots before the transaction: Argon2id must not hold a write lock.
        slots = [
            (create_slot(SlotKind.PASSWORD, password, secrets, owner), "password"),
            (create_slot(SlotKind.RECOVERY, recovery, secrets, owner), "recovery"),
        ]
        pub = secrets.public_keys()
        with self._write() as conn:
            domain_id = self._domain_id(conn, addr.domain)
            if self._alias_id(conn, domain_id, addr.local) is not None:
                raise DirectoryError(f"{addr} is already an alias")
            try:
                user_id = conn.execute(
                    t.users.insert().values(
                        domain_id=domain_id,
                        local_part=addr.local,
                        mailbox_id=mailbox_id,
                        public_keys=pub.to_bytes(),
                        created_at=_now(),
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            except IntegrityError as exc:
                raise DirectoryError(f"user {addr} already exists") from exc
            for slot, label in slots:
                self._insert_slot(conn, user_id, slot, label)
        user = User(user_id, addr, mailbox_id, pub)
        return NewUser(user, password if generated else None, recovery)

    def list_users(self, domain: str | None = None) -> list[User]:
        query = self._user_query()
        if domain is not None:
            query = query.where(t.domains.c.name == self._domain_name(domain))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(t.domains.c.name, t.users.c.local_part))
            return [self._user(r) for r in rows]

    def get_user(self, address: str) -> User | None:
        try:
            addr = parse_local_address(address)
        except AddressError:
            return None
        with self.engine.connect() as conn:
            return self._find_user(conn, addr)

    def remove_user(self, address: str) -> User:
        addr = self._local(address)
        with self._write() as conn:
            user = self._find_user(conn, addr)
            if user is None:
                raise DirectoryError(f"no such user: {addr}")
            conn.execute(t.key_slots.delete().where(t.key_slots.c.user_id == user.id))
            conn.execute(t.users.delete().where(t.users.c.id == user.id))
        return user

    # ---- secrets and key slots -----------------------------------------------------------

    def unlock(self, address: str, secret: str) -> Unlocked:
        """Open the account's keys with any of its secrets (password, app password, recovery)."""
        user, slots = self._user_and_slots(address)
        for _slot_id, slot in self._candidate_slots(slots, secret):
            try:
                return Unlocked(user, open_slot(slot, secret, user.mailbox_id.encode()), slot.kind)
            except WrongSecret:
                continue
        raise AuthFailed

    def authenticate(self, address: str, secret: str) -> User:
        """Check a secret without opening keys (for logins that need none, like SMTP AUTH)."""
        user, slots = self._user_and_slots(address)
        if any(verify_slot(s, secret) for _i, s in self._candidate_slots(slots, secret)):
            return user
        raise AuthFailed

    def change_password(self, address: str, current_secret: str, new_password: str | None) -> str:
        """Re-wrap the password slot; returns the new password. No mail is re-encrypted."""
        unlocked = self.unlock(address, current_secret)
        generated = new_password is None
        if new_password is None:
            new_password = generate_secret()
        else:
            check_password_strength(new_password, unlocked.user.address.local)
        owner = unlocked.user.mailbox_id.encode()
        slot = create_slot(SlotKind.PASSWORD, new_password, unlocked.secrets, owner)
        with self._write() as conn:
            conn.execute(
                t.key_slots.delete().where(
                    (t.key_slots.c.user_id == unlocked.user.id)
                    & (t.key_slots.c.kind == SlotKind.PASSWORD.value)
                )
            )
            self._insert_slot(conn, unlocked.user.id, slot, "password")
        del generated
        return new_password

    def add_app_password(self, address: str, current_secret: str, label: str) -> str:
        unlocked = self.unlock(address, current_secret)
        label = label.strip()
        if not label or len(label) > 64 or not label.isprintable():
            raise DirectoryError("app password label must be 1-64 printable characters")
        secret = generate_secret()
        slot = create_slot(
            SlotKind.APP, secret, unlocked.secrets, unlocked.user.mailbox_id.encode()
        )
        with self._write() as conn:
            self._insert_slot(conn, unlocked.user.id, slot, label)
        return secret

    def list_app_passwords(self, address: str) -> list[AppPassword]:
        user = self._require_user(address)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.key_slots.c.id, t.key_slots.c.label, t.key_slots.c.created_at)
                .where(
                    (t.key_slots.c.user_id == user.id) & (t.key_slots.c.kind == SlotKind.APP.value)
                )
                .order_by(t.key_slots.c.id)
            )
            return [AppPassword(r.id, r.label, r.created_at) for r in rows]

    def revoke_app_password(self, address: str, which: str) -> AppPassword:
        """Delete an app password's slot by id or label: it opens nothing afterwards."""
        matches = [
            a for a in self.list_app_passwords(address) if str(a.id) == which or a.label == which
        ]
        if not matches:
            raise DirectoryError(f"no app password {which!r} for {address}")
        if len(matches) > 1:
            raise DirectoryError(f"several app passwords are labelled {which!r}; revoke by id")
        with self._write() as conn:
            conn.execute(t.key_slots.delete().where(t.key_slots.c.id == matches[0].id))
        return matches[0]

    # ---- aliases and routing -------------------------------------------------------------

    def add_alias(self, alias: str, targets: Iterable[str]) -> Alias:
        local, _, domain = alias.strip().rpartition("@")
        addr = Address("*", normalise_domain(domain)) if local == "*" else self._local(alias)
        target_list = list(dict.fromkeys(targets))
        if not target_list:
            raise DirectoryError("an alias needs at least one target")
        if len(target_list) > MAX_ALIAS_TARGETS:
            raise DirectoryError(f"an alias forwards to at most {MAX_ALIAS_TARGETS} targets")
        with self._write() as conn:
            domain_id = self._domain_id(conn, addr.domain)
            hosted = set(conn.execute(sa.select(t.domains.c.name)).scalars())
            clean: list[str] = []
            for target in target_list:
                clean.append(self._alias_target(conn, target, hosted))
            if addr.local != "*" and self._find_user(conn, addr) is not None:
                raise DirectoryError(f"{addr} is already a user")
            try:
                alias_id = conn.execute(
                    t.aliases.insert().values(
                        domain_id=domain_id, local_part=addr.local, created_at=_now()
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            except IntegrityError as exc:
                raise DirectoryError(f"alias {addr} already exists") from exc
            conn.execute(
                t.alias_targets.insert(),
                [{"alias_id": alias_id, "position": i, "target": c} for i, c in enumerate(clean)],
            )
        return Alias(str(addr), tuple(clean))

    def list_aliases(self, domain: str | None = None) -> list[Alias]:
        query = (
            sa.select(t.aliases.c.local_part, t.domains.c.name, t.alias_targets.c.target)
            .join(t.domains, t.domains.c.id == t.aliases.c.domain_id)
            .join(t.alias_targets, t.alias_targets.c.alias_id == t.aliases.c.id)
            .order_by(t.domains.c.name, t.aliases.c.local_part, t.alias_targets.c.position)
        )
        if domain is not None:
            query = query.where(t.domains.c.name == self._domain_name(domain))
        grouped: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for local, dom, target in conn.execute(query):
                grouped.setdefault(f"{local}@{dom}", []).append(target)
        return [Alias(a, tuple(ts)) for a, ts in grouped.items()]

    def remove_alias(self, alias: str) -> None:
        local, _, domain = alias.strip().rpartition("@")
        addr = Address("*", normalise_domain(domain)) if local == "*" else self._local(alias)
        with self._write() as conn:
            domain_id = self._domain_id(conn, addr.domain)
            alias_id = self._alias_id(conn, domain_id, addr.local)
            if alias_id is None:
                raise DirectoryError(f"no such alias: {addr}")
            conn.execute(t.alias_targets.delete().where(t.alias_targets.c.alias_id == alias_id))
            conn.execute(t.aliases.delete().where(t.aliases.c.id == alias_id))

    def sendable_addresses(self, user: User) -> set[str]:
        """Addresses ``user`` may send as: their own and every exact alias that reaches them.

        A catch-all is not included: being its target does not make every address of the
        domain the user's to send from.
        """
        own = {str(user.address)}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.aliases.c.local_part, t.domains.c.name)
                .join(t.domains, t.domains.c.id == t.aliases.c.domain_id)
                .join(t.alias_targets, t.alias_targets.c.alias_id == t.aliases.c.id)
                .where(t.alias_targets.c.target == str(user.address))
                .where(t.aliases.c.local_part != "*")
            )
            own |= {f"{local}@{domain}" for local, domain in rows}
        return own

    def may_send_as(self, user: User, address: str) -> bool:
        return address_owned(self.sendable_addresses(user), address)

    def route(self, address: str) -> Route:
        """Where mail for ``address`` goes: exact user, plus-tag, exact alias, then catch-all;
        postmaster, when none of those, to the domain's first account."""
        local, _, domain = address.strip().rpartition("@")
        try:
            domain = normalise_domain(domain)
        except AddressError:
            return Route(RouteKind.NOT_HOSTED)
        base, tag = split_plus(local.lower())
        with self.engine.connect() as conn:
            domain_id = conn.execute(
                sa.select(t.domains.c.id).where(t.domains.c.name == domain)
            ).scalar()
            if domain_id is None:
                return Route(RouteKind.NOT_HOSTED)
            user = self._find_user(conn, Address(base, domain))
            if user is not None:
                return Route(RouteKind.LOCAL, users=(user,), tag=tag)
            for candidate in (base, "*"):
                alias_id = self._alias_id(conn, domain_id, candidate)
                if alias_id is not None:
                    return self._alias_route(conn, alias_id, tag)
            if base == POSTMASTER:
                # RFC 5321 §4.5.1: every domain we accept mail for has a postmaster, and the
                # DMARC and TLS-RPT records we publish send reports there. Without a user or
                # alias of that name, it is the domain's first account.
                row = conn.execute(
                    self._user_query()
                    .where(t.users.c.domain_id == domain_id)
                    .order_by(t.users.c.id)
                    .limit(1)
                ).first()
                if row is not None:
                    return Route(RouteKind.LOCAL, users=(self._user(row),), tag=tag)
            dns_rules = conn.execute(
                sa.select(t.domain_forwarding.c.dns_rules).where(
                    t.domain_forwarding.c.domain_id == domain_id
                )
            ).scalar()
        return Route(RouteKind.UNKNOWN_USER, tag=tag, dns_rules=bool(dns_rules))

    # ---- forwarding settings -------------------------------------------------------------

    def set_dns_rules(self, domain: str, enabled: bool) -> None:
        """Let (or stop letting) the domain's ``forward-email=`` TXT records route its mail."""
        name = self._domain_name(domain)
        with self._write() as conn:
            domain_id = self._domain_id(conn, name)
            self._forwarding_row(conn, domain_id)
            conn.execute(
                t.domain_forwarding.update()
                .where(t.domain_forwarding.c.domain_id == domain_id)
                .values(dns_rules=enabled)
            )

    def dns_rules_enabled(self, domain: str) -> bool:
        name = self._domain_name(domain)
        with self.engine.connect() as conn:
            domain_id = self._domain_id(conn, name)
            return bool(
                conn.execute(
                    sa.select(t.domain_forwarding.c.dns_rules).where(
                        t.domain_forwarding.c.domain_id == domain_id
                    )
                ).scalar()
            )

    def webhook_secret(self, domain: str, *, rotate: bool = False) -> bytes:
        """The domain's webhook signing key, created on first use (or replaced: ``rotate``)."""
        if self.server_key is None:
            raise DirectoryError("webhook secrets need the server key")
        name = self._domain_name(domain)
        aad = name.encode()
        with self.engine.connect() as conn:
            domain_id = self._domain_id(conn, name)
            sealed = conn.execute(
                sa.select(t.domain_forwarding.c.webhook_secret_sealed).where(
                    t.domain_forwarding.c.domain_id == domain_id
                )
            ).scalar()
        if sealed is not None and not rotate:
            return self.server_key.open(b"webhook", bytes(sealed), aad)
        secret = pysecrets.token_bytes(32)
        with self._write() as conn:
            self._forwarding_row(conn, domain_id)
            conn.execute(
                t.domain_forwarding.update()
                .where(t.domain_forwarding.c.domain_id == domain_id)
                .values(webhook_secret_sealed=self.server_key.seal(b"webhook", secret, aad))
            )
        return secret

    @staticmethod
    def _forwarding_row(conn: sa.Connection, domain_id: int) -> None:
        exists = conn.execute(
            sa.select(t.domain_forwarding.c.domain_id).where(
                t.domain_forwarding.c.domain_id == domain_id
            )
        ).first()
        if exists is None:
            conn.execute(t.domain_forwarding.insert().values(domain_id=domain_id, dns_rules=False))

    # ---- helpers -------------------------------------------------------------------------

    def _alias_route(self, conn: sa.Connection, alias_id: int, tag: str | None) -> Route:
        targets = conn.execute(
            sa.select(t.alias_targets.c.target)
            .where(t.alias_targets.c.alias_id == alias_id)
            .order_by(t.alias_targets.c.position)
        ).scalars()
        users: list[User] = []
        forwards: list[str] = []
        webhooks: list[str] = []
        for target in targets:
            if target.startswith("https://"):
                webhooks.append(target)
                continue
            user = self._find_user(conn, parse_remote_address(target))
            if user is not None:
                users.append(user)
            else:
                forwards.append(target)
        return Route(RouteKind.LOCAL, tuple(users), tuple(forwards), tag, tuple(webhooks))

    def _alias_target(self, conn: sa.Connection, target: str, hosted: set[str]) -> str:
        if target.lower().startswith(("https://", "http://")):
            return webhook_target(target)
        try:
            addr = parse_remote_address(target)
        except AddressError as exc:
            raise DirectoryError(f"invalid alias target {target!r}") from exc
        if addr.domain in hosted:
            local = Address(addr.local.lower(), addr.domain)
            # Targets in our domains must be users: alias chains would allow loops.
            if self._find_user(conn, local) is None:
                raise DirectoryError(f"alias target {local} is not a user here")
            return str(local)
        return str(addr)

    @staticmethod
    def _candidate_slots(
        slots: list[tuple[int, KeySlot]], secret: str
    ) -> list[tuple[int, KeySlot]]:
        # Generated-secret slots cost microseconds: try them before the Argon2id one, so an
        # app-password login never pays for the slow KDF.
        del secret
        return sorted(slots, key=lambda s: s[1].kind is SlotKind.PASSWORD)

    def _user_and_slots(self, address: str) -> tuple[User, list[tuple[int, KeySlot]]]:
        try:
            addr = parse_local_address(address)
        except AddressError as exc:
            raise AuthFailed from exc
        with self.engine.connect() as conn:
            user = self._find_user(conn, addr)
            if user is None:
                raise AuthFailed
            rows = conn.execute(sa.select(t.key_slots).where(t.key_slots.c.user_id == user.id))
            slots = [
                (r.id, KeySlot(SlotKind(r.kind), r.salt, dict(r.kdf), r.verifier, r.wrapped))
                for r in rows
            ]
        return user, slots

    def _insert_slot(self, conn: sa.Connection, user_id: int, slot: KeySlot, label: str) -> None:
        conn.execute(
            t.key_slots.insert().values(
                user_id=user_id,
                kind=slot.kind.value,
                label=label,
                salt=slot.salt,
                kdf=slot.kdf,
                verifier=slot.verifier,
                wrapped=slot.wrapped,
                created_at=_now(),
            )
        )

    def _require_user(self, address: str) -> User:
        user = self.get_user(address)
        if user is None:
            raise DirectoryError(f"no such user: {address}")
        return user

    @staticmethod
    def _user_query() -> sa.Select[tuple[object, ...]]:
        return sa.select(
            t.users.c.id,
            t.users.c.local_part,
            t.domains.c.name,
            t.users.c.mailbox_id,
            t.users.c.public_keys,
        ).join(t.domains, t.domains.c.id == t.users.c.domain_id)

    @staticmethod
    def _user(row: sa.Row[tuple[object, ...]]) -> User:
        m = row._mapping
        return User(
            int(m["id"]),
            Address(str(m["local_part"]), str(m["name"])),
            str(m["mailbox_id"]),
            PublicKeys.from_bytes(bytes(m["public_keys"])),
        )

    def _find_user(self, conn: sa.Connection, addr: Address) -> User | None:
        row = conn.execute(
            self._user_query().where(
                (t.domains.c.name == addr.domain) & (t.users.c.local_part == addr.local)
            )
        ).first()
        return self._user(row) if row is not None else None

    @staticmethod
    def _domain_name(name: str) -> str:
        try:
            return normalise_domain(name)
        except AddressError as exc:
            raise DirectoryError(str(exc)) from exc

    @staticmethod
    def _local(address: str) -> Address:
        try:
            return parse_local_address(address)
        except AddressError as exc:
            raise DirectoryError(str(exc)) from exc

    @staticmethod
    def _domain_id(conn: sa.Connection, domain: str) -> int:
        domain_id = conn.execute(
            sa.select(t.domains.c.id).where(t.domains.c.name == domain)
        ).scalar()
        if domain_id is None:
            raise DirectoryError(f"unknown domain: {domain} (add it with 'mailfort domain add')")
        return int(domain_id)

    @staticmethod
    def _alias_id(conn: sa.Connection, domain_id: int, local: str) -> int | None:
        alias_id = conn.execute(
            sa.select(t.aliases.c.id).where(
                (t.aliases.c.domain_id == domain_id) & (t.aliases.c.local_part == local)
            )
        ).scalar()
        return int(alias_id) if alias_id is not None else None
