"""Key derivation: Argon2id for secrets people choose, HKDF for secrets we generate.

A human-chosen password has little entropy, so each guess must cost memory and time
(Argon2id). A generated app password or recovery key carries at least 128 random bits, so a
guess is hopeless however cheap it is: HKDF suffices and keeps mail-client logins fast.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from typing import Any

from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# Each Argon2id run holds its whole memory cost; bounding concurrent runs bounds the memory
# a burst of logins can take (64 MiB x 4 here) and keeps the other core free for mail.
_argon2_gate = threading.BoundedSemaphore(int(os.environ.get("MAILFORT_ARGON2_CONCURRENCY", "2")))

MIN_ARGON2_MEMORY_KIB = 8 * 1024


@dataclass(frozen=True)
class Argon2Params:
    """Stored beside each password slot, so raising the cost later keeps old slots usable."""

    memory_kib: int = 64 * 1024
    time_cost: int = 3
    parallelism: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"alg": "argon2id", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Argon2Params:
        if data.get("alg") != "argon2id":
            raise ValueError(f"unknown KDF {data.get('alg')!r}")
        return cls(int(data["memory_kib"]), int(data["time_cost"]), int(data["parallelism"]))

    @classmethod
    def from_env(cls) -> Argon2Params:
        """Defaults, overridable for the operator's hardware (never below 8 MiB)."""
        memory = int(os.environ.get("MAILFORT_ARGON2_MEMORY_KIB", str(cls.memory_kib)))
        time_cost = int(os.environ.get("MAILFORT_ARGON2_TIME_COST", str(cls.time_cost)))
        if memory < MIN_ARGON2_MEMORY_KIB or time_cost < 1:
            raise ValueError(
                f"MAILFORT_ARGON2_MEMORY_KIB must be >= {MIN_ARGON2_MEMORY_KIB} "
                "and MAILFORT_ARGON2_TIME_COST >= 1"
            )
        return cls(memory, time_cost)


def argon2id(secret: bytes, salt: bytes, params: Argon2Params, length: int = 32) -> bytes:
    with _argon2_gate:
        return hash_secret_raw(
            secret,
            salt,
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=length,
            type=Type.ID,
        )


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
