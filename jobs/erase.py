"""Erasing devices, named as the earbuds send them or as the store keeps them."""

from __future__ import annotations

from storage.config import StorageConfig
from storage.router import erase_devices

__all__ = ["erase"]


def erase(config: StorageConfig, sent: list[str] = (), stored: list[str] = ()) -> dict:
    """Erase devices from every store (``storage.router.erase_devices``): ``sent`` ids hashed with the
    store's pseudonym key as ingest does, ``stored`` ids as they are (none at all: a StorageError
    saying so). What went, per backend and table."""
    pseudonyms = config.pseudonyms() if sent else None
    return erase_devices(config, [*(pseudonyms.of(d) for d in sent), *stored])
