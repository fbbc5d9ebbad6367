"""Directory tables (SQLAlchemy Core) and their versioned migrations.

The directory holds who exists and how to reach their keys: domains, users with their public
delivery keys, aliases, and key slots (only verifiers and wrapped keys, never a secret).
It runs on SQLite for one node and PostgreSQL for several, so only portable types are used.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

domains = sa.Table(
    "domains",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(253), nullable=False, unique=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("domain_id", sa.ForeignKey("domains.id"), nullable=False),
    sa.Column("local_part", sa.String(64), nullable=False),
    # Opaque name of the mailbox file: the file system never shows whose mail it holds.
    sa.Column("mailbox_id", sa.String(32), nullable=False, unique=True),
    sa.Column("public_keys", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("domain_id", "local_part"),
)

aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("domain_id", sa.ForeignKey("domains.id"), nullable=False),
    # "*" is the domain's catch-all.
    sa.Column("local_part", sa.String(64), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("domain_id", "local_part"),
)

alias_targets = sa.Table(
    "alias_targets",
    metadata,
    sa.Column("alias_id", sa.ForeignKey("aliases.id", ondelete="CASCADE"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("target", sa.String(320), nullable=False),
    sa.PrimaryKeyConstraint("alias_id", "position"),
)

key_slots = sa.Table(
    "key_slots",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("salt", sa.LargeBinary, nullable=False),
    sa.Column("kdf", sa.JSON, nullable=False),
    sa.Column("verifier", sa.LargeBinary, nullable=False),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Index("key_slots_user", "user_id"),
)


dkim_keys = sa.Table(
    "dkim_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("domain_id", sa.ForeignKey("domains.id", ondelete="CASCADE"), nullable=False),
    sa.Column("selector", sa.String(63), nullable=False),
    sa.Column("algorithm", sa.String(16), nullable=False),  # "ed25519" or "rsa"
    # Sealed under the server key (keys/server.py): the database alone cannot sign.
    sa.Column("private_sealed", sa.LargeBinary, nullable=False),
    sa.Column("public_key", sa.Text, nullable=False),  # base64, as published in DNS
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("retired_at", sa.BigInteger, nullable=True),
    sa.UniqueConstraint("domain_id", "selector"),
)


# Per-domain forwarding settings (issue 5). A row exists only once a setting was changed.
domain_forwarding = sa.Table(
    "domain_forwarding",
    metadata,
    sa.Column("domain_id", sa.ForeignKey("domains.id", ondelete="CASCADE"), primary_key=True),
    # Forward Email's DNS TXT rules (forward-email=...) apply: off unless the operator says so,
    # since whoever controls the zone then decides where the domain's mail goes.
    sa.Column("dns_rules", sa.Boolean, nullable=False, default=False),
    # HMAC key for webhook targets, sealed under the server key like the DKIM keys.
    sa.Column("webhook_secret_sealed", sa.LargeBinary, nullable=True),
)


def _v1(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[domains, users, aliases, alias_targets, key_slots])


def _v2(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[dkim_keys])


def _v3(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[domain_forwarding])


# Append-only: each entry moves the schema one version up; released entries never change.
MIGRATIONS: list[Callable[[sa.Connection], None]] = [_v1, _v2, _v3]
LATEST = len(MIGRATIONS)


def migrate(engine: sa.Engine) -> int:
    """Bring the schema to the latest version; returns the version found before."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Two nodes starting at once must not both migrate.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(726001)"))
        metadata.create_all(conn, tables=[schema_version])
        current = conn.execute(sa.select(schema_version.c.version)).scalar()
        if current is None:
            conn.execute(schema_version.insert().values(version=0))
            current = 0
        if current > LATEST:
            raise RuntimeError(
                f"directory schema version {current} is newer than this mailfort ({LATEST})"
            )
        for step in MIGRATIONS[current:]:
            step(conn)
        conn.execute(schema_version.update().values(version=LATEST))
        return int(current)
