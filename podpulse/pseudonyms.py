"""Pseudonyms made by PodPulse: every device id is replaced at ingest by a keyed hash.

The pseudonym of an id is HMAC-SHA-256 under a secret key, its first 128 bits in hex (32
characters, which the event contract's id pattern accepts, so a pseudonym is a valid id
everywhere an id is taken). Without the key nobody can go from an id to its pseudonym or
back; with it, PodPulse maps an id a person knows (``podpulse pseudonym``, ``podpulse erase``,
the simulator's ground truth) to the one stored. The consumers hash each batch before it
reaches the writer, so no store holds an id as sent. The Kafka topic and its dead-letter
topic do: they hold what producers wrote, under Kafka's own retention.

The key is a file (a Kubernetes Secret mounted as one) of at least 32 bytes; ``podpulse``
creates a random one the first time it ingests when none exists. Rotating it gives every
device a new pseudonym: see "Re-keying" in the README.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from podpulse.errors import ConfigError

__all__ = ["Pseudonyms", "KEY_ENV", "MIN_KEY_BYTES", "PSEUDONYM_HEX"]

KEY_ENV = "PODPULSE_PSEUDONYM_KEY_FILE"
MIN_KEY_BYTES = 32
PSEUDONYM_HEX = 32  # 128 bits: a collision needs about 2**64 devices
CACHE_LIMIT = 1_000_000  # ids remembered per process (about 150 MB at the limit); then it starts over


class Pseudonyms:
    """Device id → pseudonym under one key. Cheap to call again: ids seen are remembered."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"the pseudonym key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._seen: dict[str, str] = {}

    @classmethod
    def load(cls, path: str | Path, *, create: bool = False) -> "Pseudonyms":
        """The key in ``path`` (surrounding whitespace ignored). ``create``: write a random key
        there (mode 0600) when the file does not exist yet."""
        path = Path(path)
        if create and not path.exists():
            _create_key(path)
        try:
            key = path.read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the pseudonym key {path}: {e.strerror} (set {KEY_ENV} or "
                              "pseudonym_key_file in the storage config)") from e
        try:
            return cls(key)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def of(self, device_id: str) -> str:
        """The pseudonym of one id."""
        found = self._seen.get(device_id)
        if found is None:
            mac = self._mac.copy()
            mac.update(device_id.encode())
            found = mac.hexdigest()[:PSEUDONYM_HEX]
            if len(self._seen) >= CACHE_LIMIT:
                self._seen.clear()
            self._seen[device_id] = found
        return found

    def column(self, ids: pa.Array | pa.ChunkedArray) -> pa.Array:
        """A string column of ids → their pseudonyms, each distinct id hashed once."""
        encoded = pc.dictionary_encode(ids)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        names = pa.array([self.of(i) for i in encoded.dictionary.to_pylist()], pa.string())
        return names.take(encoded.indices)

    def table(self, events: pa.Table) -> pa.Table:
        """``events`` with its ``device_id`` column replaced by pseudonyms."""
        i = events.schema.get_field_index("device_id")
        return events.set_column(i, events.schema.field(i), self.column(events["device_id"]))

    def keys(self, by_id: dict[str, object]) -> dict[str, object]:
        """A mapping keyed by ids (the simulator's ground truth) → keyed by pseudonyms."""
        return {self.of(k): v for k, v in by_id.items()}


def _create_key(path: Path) -> None:
    """A random key at ``path``, unless one appears there first: written aside, then linked in
    (atomic), so a process reading the key never sees it half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
        os.link(aside, path)
    except FileExistsError:
        pass  # another process made it first: theirs is the key
    finally:
        aside.unlink(missing_ok=True)
