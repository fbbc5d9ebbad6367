"""The directory on both backends: SQLite (embedded default) and the PostgreSQL server."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailfort.directory import schema
from mailfort.directory.addresses import AddressError
from mailfort.directory.passwords import WeakPassword
from mailfort.directory.service import AuthFailed, Directory, DirectoryError, RouteKind
from mailfort.keys.slots import SlotKind

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def directory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Directory]:
    if request.param == "sqlite":
        d = Directory.open(f"sqlite:///{tmp_path / 'dir.sqlite3'}")
        yield d
        d.close()
        return
    # Each test gets its own PostgreSQL schema on the real server, dropped afterwards.
    name = f"mf_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {name}"))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is required: {exc}")
    engine = sa.create_engine(PG_URL, connect_args={"options": f"-csearch_path={name}"})
    d = Directory(engine)
    yield d
    d.close()
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {name} CASCADE"))
    admin.dispose()


def test_domains(directory: Directory) -> None:
    assert directory.add_domain("Example.TEST.") == "example.test"
    directory.add_domain("bücher.test")
    assert directory.list_domains() == ["example.test", "xn--bcher-kva.test"]
    with pytest.raises(DirectoryError, match="already exists"):
        directory.add_domain("example.test")
    for bad in ("nodot", "-bad.test", "a..b.test", "x" * 64 + ".test", "bad_domain.test"):
        with pytest.raises((DirectoryError, AddressError)):
            directory.add_domain(bad)
    directory.remove_domain("xn--bcher-kva.test")
    assert directory.list_domains() == ["example.test"]


def test_user_lifecycle_and_logins(directory: Directory) -> None:
    directory.add_domain("example.test")
    new = directory.add_user("Alice@Example.test")
    assert str(new.user.address) == "alice@example.test"
    assert new.password is not None and new.recovery_key
    assert directory.unlock("alice@example.test", new.password).slot_kind is SlotKind.PASSWORD
    by_recovery = directory.unlock("alice@example.test", new.recovery_key)
    assert by_recovery.slot_kind is SlotKind.RECOVERY
    assert (
        by_recovery.secrets.data_key
        == directory.unlock("alice@example.test", new.password).secrets.data_key
    )
    with pytest.raises(AuthFailed):
        directory.unlock("alice@example.test", "not the password")
    with pytest.raises(AuthFailed):  # unknown user: the same refusal
        directory.unlock("nobody@example.test", new.password)
    assert (
        directory.authenticate("alice@example.test", new.password).mailbox_id == new.user.mailbox_id
    )
    with pytest.raises(DirectoryError, match="already exists"):
        directory.add_user("alice@example.test")
    with pytest.raises(DirectoryError, match="unknown domain"):
        directory.add_user("bob@elsewhere.test")
    assert [str(u.address) for u in directory.list_users()] == ["alice@example.test"]


def test_refusals_leave_nothing_behind(directory: Directory) -> None:
    directory.add_domain("example.test")
    for bad in (
        "bob+x@example.test",
        "bö@example.test",
        "a@b@example.test",
        ".a@example.test",
        "noat",
    ):
        with pytest.raises((DirectoryError, AddressError)):
            directory.add_user(bad)
    with pytest.raises(WeakPassword):
        directory.add_user("bob@example.test", "short")
    with pytest.raises(WeakPassword):
        directory.add_user("bob@example.test", "aaaaaaaaaaaaaaaa")
    assert directory.list_users() == []
    with directory.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.key_slots)).scalar() == 0


def test_password_change_rewraps_and_old_password_fails(directory: Directory) -> None:
    directory.add_domain("example.test")
    new = directory.add_user("carol@example.test", "first long passphrase")
    before = directory.unlock("carol@example.test", "first long passphrase").secrets.data_key
    directory.change_password(
        "carol@example.test", "first long passphrase", "second long passphrase"
    )
    with pytest.raises(AuthFailed):
        directory.unlock("carol@example.test", "first long passphrase")
    after = directory.unlock("carol@example.test", "second long passphrase").secrets.data_key
    assert after == before  # re-wrapped, not re-keyed: no mail is re-encrypted
    # The recovery key resets a forgotten password.
    generated = directory.change_password("carol@example.test", new.recovery_key, None)
    assert directory.unlock("carol@example.test", generated).secrets.data_key == before


def test_app_passwords_and_revocation(directory: Directory) -> None:
    directory.add_domain("example.test")
    directory.add_user("dave@example.test", "a long passphrase for d")
    phone = directory.add_app_password("dave@example.test", "a long passphrase for d", "phone")
    laptop = directory.add_app_password("dave@example.test", "a long passphrase for d", "laptop")
    assert [a.label for a in directory.list_app_passwords("dave@example.test")] == [
        "phone",
        "laptop",
    ]
    assert directory.unlock("dave@example.test", phone).slot_kind is SlotKind.APP
    directory.revoke_app_password("dave@example.test", "phone")
    with pytest.raises(AuthFailed):
        directory.unlock("dave@example.test", phone)
    with pytest.raises(AuthFailed):
        directory.authenticate("dave@example.test", phone)
    assert directory.unlock("dave@example.test", laptop).slot_kind is SlotKind.APP
    with pytest.raises(AuthFailed):  # adding one needs a working secret
        directory.add_app_password("dave@example.test", phone, "tablet")
    with pytest.raises(DirectoryError):
        directory.revoke_app_password("dave@example.test", "phone")


def test_routing(directory: Directory) -> None:
    directory.add_domain("example.test")
    directory.add_domain("other.test")
    directory.add_user("erin@example.test")
    directory.add_user("frank@example.test")
    directory.add_alias(
        "team@example.test", ["erin@example.test", "Frank@Example.test", "X.Y@remote.org"]
    )
    route = directory.route("Erin+lists@EXAMPLE.test")
    assert route.kind is RouteKind.LOCAL and route.tag == "lists"
    assert [str(u.address) for u in route.users] == ["erin@example.test"]
    team = directory.route("team+x@example.test")
    assert [str(u.address) for u in team.users] == ["erin@example.test", "frank@example.test"]
    assert team.forwards == ("X.Y@remote.org",) and team.tag == "x"
    assert directory.route("nobody@example.test").kind is RouteKind.UNKNOWN_USER
    assert directory.route("erin@elsewhere.test").kind is RouteKind.NOT_HOSTED
    directory.add_alias("*@other.test", ["frank@example.test"])
    assert [str(u.address) for u in directory.route("anything@other.test").users] == [
        "frank@example.test"
    ]
    with pytest.raises(DirectoryError, match="not a user"):
        directory.add_alias("x@example.test", ["ghost@example.test"])
    with pytest.raises(DirectoryError, match="already a user"):
        directory.add_alias("erin@example.test", ["frank@example.test"])
    with pytest.raises(DirectoryError, match="at most 10"):
        directory.add_alias("many@example.test", [f"u{i}@remote.org" for i in range(11)])
    with pytest.raises(DirectoryError, match="still has"):
        directory.remove_domain("example.test")
    directory.remove_alias("team@example.test")
    assert directory.route("team@example.test").kind is RouteKind.UNKNOWN_USER


def test_migrations_are_versioned_and_idempotent(directory: Directory) -> None:
    assert schema.migrate(directory.engine) == schema.LATEST  # already at latest
    with directory.engine.begin() as conn:
        conn.execute(schema.schema_version.update().values(version=schema.LATEST + 1))
    with pytest.raises(RuntimeError, match="newer"):
        schema.migrate(directory.engine)


def test_postmaster_reaches_the_domains_first_account_unless_named(directory: Directory) -> None:
    """RFC 5321 §4.5.1: every hosted domain has a postmaster (our DMARC and TLS-RPT
    records send reports there), even when nobody created that address."""
    directory.add_domain("example.test")
    directory.add_domain("empty.test")
    first = directory.add_user("alice@example.test").user
    directory.add_user("bob@example.test")
    route = directory.route("PostMaster@example.test")
    assert route.kind is RouteKind.LOCAL and [u.mailbox_id for u in route.users] == [
        first.mailbox_id
    ]
    assert directory.route("postmaster+dmarc@example.test").tag == "dmarc"
    assert directory.route("hostmaster@example.test").kind is RouteKind.UNKNOWN_USER
    assert directory.route("postmaster@empty.test").kind is RouteKind.UNKNOWN_USER
    # A postmaster the operator set up wins.
    directory.add_alias("postmaster@example.test", ["bob@example.test"])
    route = directory.route("postmaster@example.test")
    assert [str(u.address) for u in route.users] == ["bob@example.test"]
