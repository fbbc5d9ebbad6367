"""Typed settings: a TOML file, then environment overrides, validated at start.

A bad setting stops the service at start with one line naming the key, rather than failing
later in a session.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailfort.dns import Nameserver
from mailfort.store.quota import DEFAULT_QUOTA_BYTES, DEFAULT_QUOTA_MESSAGES, Quota

LISTENERS = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s", "https")
PRODUCTION_PORTS = {
    "smtp": 25,
    "submission": 587,
    "submissions": 465,
    "imap": 143,
    "imaps": 993,
    "pop3": 110,
    "pop3s": 995,
    "https": 443,
}


class ConfigError(Exception):
    """A setting that cannot be used; the message names the key."""


@dataclass
class Settings:
    data_dir: Path
    hostname: str = field(default_factory=socket.getfqdn)
    directory_url: str = ""
    nameservers: list[Nameserver] = field(default_factory=list)
    listen_host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Domains whose ARC seal may override a DMARC reject (mailing lists, forwarders we trust).
    trusted_forwarders: list[str] = field(default_factory=list)
    # The port outbound delivery connects to: 25 on the Internet; tests point it elsewhere.
    outbound_port: int = 25
    sending_limits: dict[str, int] = field(default_factory=dict)
    # CA bundle for PKIX checks of MX certificates and MTA-STS policy hosts (RFC 8461
    # §3.3, §4.2); None is the system store. Tests give their own CA.
    outbound_ca_file: Path | None = None
    # RFC 8461 §3.3 fixes 443 for the policy host; tests serve policies elsewhere.
    mta_sts_port: int = 443
    # Webhook targets on private, loopback or link-local addresses would let a domain owner
    # make this server call into the operator's own network (SSRF): off unless allowed.
    allow_private_webhooks: bool = False
    # Per-mailbox limits (RFC 9208 STORAGE and MESSAGE); None: the store's defaults, 0: none.
    quota_bytes: int | None = None
    quota_messages: int | None = None

    def quota(self) -> Quota:
        """What delivery, APPEND and COPY may fill a mailbox up to."""
        return Quota(
            DEFAULT_QUOTA_BYTES if self.quota_bytes is None else (self.quota_bytes or None),
            DEFAULT_QUOTA_MESSAGES
            if self.quota_messages is None
            else (self.quota_messages or None),
        )

    def __post_init__(self) -> None:
        if not self.directory_url:
            self.directory_url = f"sqlite:///{self.data_dir / 'directory.sqlite3'}"
        if self.tls_cert is None:
            self.tls_cert = self.data_dir / "tls" / "cert.pem"
        if self.tls_key is None:
            self.tls_key = self.data_dir / "tls" / "key.pem"


# Per-user sending limits (smtp/limits.py); the defaults live in SendingPolicy.
_LIMIT_NAMES = (
    "messages_per_hour",
    "messages_per_day",
    "recipients_per_hour",
    "recipients_per_day",
)

_SCHEMA: dict[str, dict[str, type]] = {
    "": {"data_dir": str, "hostname": str},
    "directory": {"url": str},
    "dns": {"nameservers": list},
    "listen": {"host": str, **{name: int for name in LISTENERS}},
    "tls": {"cert": str, "key": str},
    "smtp": {"trusted_forwarders": list},
    "outbound": {"port": int, "ca_file": str, "mta_sts_port": int},
    "submission": {name: int for name in _LIMIT_NAMES},
    "forward": {"allow_private_webhooks": bool},
    "quota": {"bytes": int, "messages": int},
}

# Environment overrides: the variable, and the TOML key it replaces.
_ENV = {
    "MAILFORT_DATA_DIR": "data_dir",
    "MAILFORT_HOSTNAME": "hostname",
    "MAILFORT_DIRECTORY_URL": "directory.url",
    "MAILFORT_DNS": "dns.nameservers",
    "MAILFORT_TRUSTED_FORWARDERS": "smtp.trusted_forwarders",
    "MAILFORT_OUTBOUND_PORT": "outbound.port",
    "MAILFORT_OUTBOUND_CA_FILE": "outbound.ca_file",
    "MAILFORT_MTA_STS_PORT": "outbound.mta_sts_port",
    "MAILFORT_FORWARD_ALLOW_PRIVATE_WEBHOOKS": "forward.allow_private_webhooks",
    "MAILFORT_QUOTA_BYTES": "quota.bytes",
    "MAILFORT_QUOTA_MESSAGES": "quota.messages",
    **{f"MAILFORT_SUBMISSION_{name.upper()}": f"submission.{name}" for name in _LIMIT_NAMES},
}
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_LIST_KEYS = {"dns.nameservers", "smtp.trusted_forwarders"}


def _flatten(doc: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            if key not in _SCHEMA or key == "":
                raise ConfigError(f"unknown section [{key}]")
            for sub, subvalue in value.items():
                flat[f"{key}.{sub}"] = subvalue
        else:
            flat[key] = value
    return flat


def _check(flat: dict[str, Any]) -> None:
    for key, value in flat.items():
        section, _, name = key.rpartition(".")
        expected = _SCHEMA.get(section, {}).get(name)
        if expected is None:
            raise ConfigError(f"unknown setting {key!r}")
        if expected is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"setting {key!r} must be true or false, not {value!r}")
        elif not isinstance(value, expected) or isinstance(value, bool):
            raise ConfigError(f"setting {key!r} must be a {expected.__name__}, not {value!r}")


def load(path: Path | None, env: Mapping[str, str] = os.environ) -> Settings:
    flat: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                flat = _flatten(tomllib.load(fh))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for var, key in _ENV.items():
        if var in env:
            value = env[var]
            section, _, name = key.rpartition(".")
            if key in _LIST_KEYS:
                flat[key] = [v.strip() for v in value.split(",") if v.strip()]
            elif _SCHEMA.get(section, {}).get(name) is bool:
                if value.strip().lower() not in _BOOLEANS:
                    raise ConfigError(f"{var} must be true or false, not {value!r}")
                flat[key] = _BOOLEANS[value.strip().lower()]
            elif _SCHEMA.get(section, {}).get(name) is int:
                try:
                    flat[key] = int(value)
                except ValueError as exc:
                    raise ConfigError(f"{var} must be a number, not {value!r}") from exc
            else:
                flat[key] = value
    _check(flat)
    return from_flat(flat)


def from_flat(flat: dict[str, Any]) -> Settings:
    if "data_dir" not in flat:
        raise ConfigError("setting 'data_dir' is required")
    try:
        nameservers = [Nameserver.parse(str(s)) for s in flat.get("dns.nameservers", [])]
    except ValueError as exc:
        raise ConfigError(f"setting 'dns.nameservers': {exc}") from exc
    ports: dict[str, int] = {}
    for name in LISTENERS:
        port = flat.get(f"listen.{name}")
        if port is None:
            continue
        if not 0 <= port < 65536:
            raise ConfigError(f"setting 'listen.{name}' must be a port number, not {port}")
        ports[name] = port
    if not 0 < flat.get("outbound.mta_sts_port", 443) < 65536:
        raise ConfigError("setting 'outbound.mta_sts_port' must be a port number")
    if "outbound.ca_file" in flat and not Path(flat["outbound.ca_file"]).is_file():
        # Checked here, so the error names the key rather than surfacing as a traceback.
        raise ConfigError(f"setting 'outbound.ca_file': no file {flat['outbound.ca_file']}")
    for key in ("quota.bytes", "quota.messages"):
        if flat.get(key, 0) < 0:
            raise ConfigError(f"setting {key!r} must not be negative (0: no limit)")
    settings = Settings(
        data_dir=Path(flat["data_dir"]).expanduser(),
        directory_url=flat.get("directory.url", ""),
        nameservers=nameservers,
        listen_host=flat.get("listen.host", "127.0.0.1"),
        ports=ports,
        tls_cert=Path(flat["tls.cert"]) if "tls.cert" in flat else None,
        tls_key=Path(flat["tls.key"]) if "tls.key" in flat else None,
        trusted_forwarders=[str(d).lower() for d in flat.get("smtp.trusted_forwarders", [])],
        outbound_port=int(flat.get("outbound.port", 25)),
        sending_limits={
            n: int(flat[f"submission.{n}"]) for n in _LIMIT_NAMES if f"submission.{n}" in flat
        },
        outbound_ca_file=Path(flat["outbound.ca_file"]) if "outbound.ca_file" in flat else None,
        mta_sts_port=int(flat.get("outbound.mta_sts_port", 443)),
        allow_private_webhooks=bool(flat.get("forward.allow_private_webhooks", False)),
        quota_bytes=flat.get("quota.bytes"),
        quota_messages=flat.get("quota.messages"),
    )
    if "hostname" in flat:
        settings.hostname = flat["hostname"]
    return settings
