"""Pseudonyms: a keyed hash of each device id, the key's file and where a store finds it."""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import re
import threading

import pyarrow as pa
import pytest

from actors.config import IngestConfig
from podpulse.contract import DEVICE_ID
from podpulse.errors import ConfigError
from podpulse.pseudonyms import KEY_ENV, Pseudonyms
from storage.config import StorageConfig

KEY = b"k" * 32


def test_a_pseudonym_is_the_keyed_hash_of_the_id_and_a_valid_id_itself():
    p = Pseudonyms(KEY)
    expected = hmac.new(KEY, b"ap-0011223344556677", hashlib.sha256).hexdigest()[:32]
    assert p.of("ap-0011223344556677") == expected
    assert Pseudonyms(b"K" * 32).of("ap-0011223344556677") != expected  # another key, another pseudonym
    assert re.fullmatch(r"[0-9a-f]{32}", expected) and DEVICE_ID.fullmatch(expected)  # the API takes it


def test_a_column_is_hashed_id_by_id_and_the_table_keeps_its_other_columns():
    p = Pseudonyms(KEY)
    ids = pa.chunked_array([["a-1", "b-2", "a-1"], ["c-3", "a-1"]])
    table = pa.table({"device_id": ids, "seq": [1, 2, 3, 4, 5]})
    out = p.table(table)
    assert out["device_id"].to_pylist() == [p.of(d) for d in ids.to_pylist()]
    assert out["seq"].to_pylist() == [1, 2, 3, 4, 5] and out.schema == table.schema
    assert p.keys({"a-1": "drain"}) == {p.of("a-1"): "drain"}


def test_a_short_or_missing_key_is_refused_with_its_file_named(tmp_path):
    short = tmp_path / "short.key"
    short.write_text("0123456789")
    with pytest.raises(ConfigError, match=r"short\.key: the pseudonym key must be at least 32 bytes"):
        Pseudonyms.load(short)
    with pytest.raises(ConfigError, match=rf"cannot read the pseudonym key .*nothing\.key.*{KEY_ENV}"):
        Pseudonyms.load(tmp_path / "nothing.key")


def test_a_key_is_made_once_private_and_whole_even_when_many_make_it_at_once(tmp_path):
    path = tmp_path / "keys" / "pseudonym.key"
    made: list[str] = []
    threads = [threading.Thread(target=lambda: made.append(Pseudonyms.load(path, create=True).of("ap-1")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 1 and len(made) == 8  # every caller hashes with the one key
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in path.parent.iterdir()) == ["pseudonym.key"]  # nothing left aside
    assert Pseudonyms.load(path, create=True).of("ap-1") == made[0]  # made once, never replaced


def test_a_store_finds_its_key_in_its_config_else_the_environment_else_beside_its_database(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    embedded = StorageConfig.embedded(tmp_path / "db" / "x.duckdb")
    assert embedded.key_file() == tmp_path / "db" / "pseudonym.key"
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "env.key"))
    assert embedded.key_file() == tmp_path / "env.key"
    named = StorageConfig(backends=dict(embedded.backends), pseudonym_key_file=str(tmp_path / "named.key"))
    assert named.key_file() == tmp_path / "named.key"
    assert pickle.loads(pickle.dumps(named)).key_file() == tmp_path / "named.key"  # what Ray ships


def test_ingest_makes_the_key_once_and_names_it_by_absolute_path_for_every_actor(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    config = IngestConfig(bootstrap="127.0.0.1:1", topic="t", storage=StorageConfig.embedded("data/x.duckdb"))
    resolved = config.with_pseudonym_key()
    assert resolved.storage.pseudonym_key_file == str(tmp_path / "data" / "pseudonym.key")
    made = Pseudonyms.load(tmp_path / "data" / "pseudonym.key").of("ap-1")
    os.chdir("/")  # an actor started elsewhere reads the same key
    assert resolved.storage.pseudonyms().of("ap-1") == made
    assert resolved.with_pseudonym_key().storage.pseudonyms().of("ap-1") == made  # made once


def test_a_key_behind_links_keeps_its_links_as_a_kubernetes_secret_has_them(tmp_path, monkeypatch):
    """A Secret's file is key -> ..data/key -> ..<timestamp>/key, the timestamp the pod's own: the path
    every actor reads is the one with the links, never where they lead on the driver's pod."""
    stamped = tmp_path / "..2026_12_07_17_45_06.95051120"
    stamped.mkdir()
    Pseudonyms.load(stamped / "key", create=True)
    (tmp_path / "..data").symlink_to(stamped.name)
    (tmp_path / "key").symlink_to("..data/key")
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "key"))
    config = IngestConfig(bootstrap="127.0.0.1:1", topic="t", storage=StorageConfig.embedded(tmp_path / "x.duckdb"))
    assert config.with_pseudonym_key().storage.pseudonym_key_file == str(tmp_path / "key")


def test_a_storage_config_file_may_name_its_key(tmp_path):
    path = tmp_path / "storage.yaml"
    path.write_text(f"backends: {{db: {{type: duckdb, path: {tmp_path}/x.duckdb}}}}\n"
                    f"pseudonym_key_file: {tmp_path}/secret/key\n")
    config = StorageConfig.load(path)
    assert config.key_file() == tmp_path / "secret" / "key"
    assert config.as_dict()["pseudonym_key_file"] == f"{tmp_path}/secret/key"
