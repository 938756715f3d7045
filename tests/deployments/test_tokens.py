"""Tokens and scopes, without Serve: the file's checks, the scopes a header gets, re-reading the file."""

import os

import pytest
import yaml

from deployments.tokens import SCOPES, Tokens, allows, new_token, parse_tokens

SHARED = "shared-admin-token-of-24-characters-or-more"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def bearer(token: str) -> bytes:
    return f"Bearer {token}".encode()


def test_the_tokens_file_names_the_entry_and_field_it_refuses():
    _, good = new_token("gateway", ["ingest"])
    assert parse_tokens([good])[0].scopes == {"ingest"}
    for doc, words in [({"name": "x"}, "YAML list"), ([{**good, "extra": 1}], "entry 0: must have exactly"),
                       ([good, good], "entry 1: name must be a unique"),
                       ([{**good, "sha256": "abc"}], r"entry 0 \(gateway\): sha256 must be 64"),
                       ([{**good, "scopes": ["root"]}], "scopes must be a non-empty list"),
                       ([{**good, "scopes": []}], "scopes must be a non-empty list")]:
        with pytest.raises(ValueError, match=words):
            parse_tokens(doc)
    with pytest.raises(ValueError, match="scopes"):
        new_token("x", ["everything"])


def test_admin_has_every_scope_and_the_others_only_their_own():
    """Which scope each route needs: tests/deployments/test_guard.py."""
    assert all(allows(frozenset({"admin"}), s) for s in SCOPES)
    assert not allows(frozenset({"read:aggregates"}), "read:devices")


def test_a_header_gets_its_tokens_scopes_and_nothing_else(tmp_path):
    ingest, entry = new_token("gateway", ["ingest"])
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump([entry]))
    assert "sha256" in path.read_text() and ingest not in path.read_text()  # the file holds no token
    tokens = Tokens(env={"PODPULSE_API_TOKEN": SHARED, "PODPULSE_API_TOKENS_FILE": str(path)})
    assert tokens.scopes(bearer(ingest)) == {"ingest"}
    assert tokens.scopes(bearer(SHARED)) == {"admin"}
    for header in (None, b"", b"Bearer", bearer("nope"), ingest.encode(), b"Basic " + ingest.encode(),
                   bearer(ingest) + b" ", "Bearer é".encode()):
        assert tokens.scopes(header) is None, header
    assert Tokens(env={}).scopes(bearer("")) is None  # no token configured: nothing is accepted


@pytest.fixture
def readable(monkeypatch):
    """The last value the replica gave the gauge podpulse_api_tokens_file_readable."""
    seen = []
    monkeypatch.setattr("podpulse.metrics.tokens_file_readable", lambda ok: seen.append(int(ok)))
    return lambda: seen[-1]


def test_the_file_is_read_again_when_it_changes_and_a_broken_one_revokes_its_tokens(tmp_path, readable):
    """Fail closed: a file that does not parse (or is gone) must not keep a revoked token alive."""
    (old, old_entry), (new, new_entry) = new_token("a", ["ingest"]), new_token("b", ["read:devices"])
    path, clock = tmp_path / "tokens.yaml", Clock()
    path.write_text(yaml.safe_dump([old_entry]))
    tokens = Tokens(env={"PODPULSE_API_TOKENS_FILE": str(path)}, clock=clock)
    assert tokens.scopes(bearer(old)) == {"ingest"}
    path.write_text(yaml.safe_dump([new_entry]))
    os.utime(path, (1, 1))
    assert tokens.scopes(bearer(new)) is None  # checked at most once a second
    clock.now += 1.5
    assert tokens.scopes(bearer(new)) == {"read:devices"} and tokens.scopes(bearer(old)) is None
    path.write_text("- name: [broken")
    clock.now += 1.5
    assert tokens.scopes(bearer(new)) is None and readable() == 0
    path.write_text(yaml.safe_dump([new_entry]))
    clock.now += 1.5
    assert tokens.scopes(bearer(new)) == {"read:devices"} and readable() == 1
    path.unlink()
    clock.now += 1.5
    assert tokens.scopes(bearer(new)) is None and readable() == 0


def test_an_admin_token_shorter_than_24_characters_is_refused_and_said_once(caplog):
    short, long = "a" * 23, "a" * 24
    tokens = Tokens(env={"PODPULSE_API_TOKEN": short})
    for _ in range(3):
        assert tokens.scopes(bearer(short)) is None
    assert sum("23 characters, under 24: refused" in r.getMessage() for r in caplog.records) == 1
    assert Tokens(env={"PODPULSE_API_TOKEN": long}).scopes(bearer(long)) == {"admin"}


def test_a_tokens_file_not_there_yet_is_said_once_and_read_when_it_appears(tmp_path, caplog):
    """The RayService mounts the tokens Secret as optional: until it exists, no token from it, one
    error in the log (not one a second), and its tokens count as soon as it is created."""
    path, clock = tmp_path / "tokens.yaml", Clock()
    tokens = Tokens(env={"PODPULSE_API_TOKENS_FILE": str(path)}, clock=clock)
    made, entry = new_token("gateway", ["ingest"])
    for _ in range(5):
        assert tokens.scopes(bearer(made)) is None
        clock.now += 1.5
    assert sum("cannot read" in r.getMessage() for r in caplog.records) == 1
    path.write_text(yaml.safe_dump([entry]))
    clock.now += 1.5
    assert tokens.scopes(bearer(made)) == {"ingest"}


def test_the_admin_token_may_come_from_a_file_only_its_owner_reads(tmp_path):
    from deployments.tokens import write_token_file

    clock, path = Clock(), tmp_path / "private" / "admin-token"
    write_token_file(SHARED, path)
    assert path.stat().st_mode & 0o777 == 0o600
    tokens = Tokens(env={"PODPULSE_API_TOKEN_FILE": str(path)}, clock=clock)
    assert tokens.scopes(bearer(SHARED)) == {"admin"}
    rotated = SHARED[::-1]
    path.chmod(0o644)
    write_token_file(rotated, path)  # rotated: read again, and the file is private again
    os.utime(path, (2, 2))
    clock.now += 1.5
    assert tokens.scopes(bearer(rotated)) == {"admin"} and tokens.scopes(bearer(SHARED)) is None
    assert path.stat().st_mode & 0o777 == 0o600
    path.unlink()
    clock.now += 1.5
    assert tokens.scopes(bearer(rotated)) is None
