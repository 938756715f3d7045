"""Who may call the API: bearer tokens and their scopes.

Two sources, read by every replica:

- ``$PODPULSE_API_TOKENS_FILE``: a YAML list (a Kubernetes Secret mounted as a file, say) of
  ``{name, sha256, scopes}``: the SHA-256 of a token (never the token itself) and what it may do.
  The file is read again when it changes (checked at most once a second), so a token is added,
  rotated or revoked without a restart. A file that cannot be read or parsed revokes its tokens until
  it reads again (fail closed: a half-written file must not keep a revoked token alive); the gauge
  ``podpulse_api_tokens_file_readable`` says so, and an alert fires.
- ``$PODPULSE_API_TOKEN``: one token with every scope (``admin``), for one machine and the demo; one
  shorter than :data:`MIN_ADMIN_TOKEN` characters is refused (guessable), and the log says so.
  ``$PODPULSE_API_TOKEN_FILE`` names a file holding it instead: what a process gives Serve's replicas,
  since environment variables passed through a Ray ``runtime_env`` are written to Ray's logs.

Scopes (:class:`Scope`): ``ingest`` (POST /v1/telemetry), ``read:aggregates`` (analytics, forecasts,
scoring), ``read:devices`` (per-device reads, and analytics' device ids) and ``admin`` (all of them,
and the writes: erasing a device, saving a cohort). Each route declares the scope it needs
(``deployments.guard.needs``). ``podpulse token`` makes a token and its file entry.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import yaml

from podpulse import metrics

__all__ = ["Scope", "SCOPES", "Token", "Tokens", "parse_tokens", "new_token", "allows", "write_token_file"]


class Scope(str, Enum):
    """What an API token may do."""

    ingest = "ingest"
    read_aggregates = "read:aggregates"
    read_devices = "read:devices"
    admin = "admin"


SCOPES = tuple(s.value for s in Scope)
RECHECK_S = 1.0  # how often a replica looks at the tokens file's modification time
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BEARER = b"Bearer "
MIN_ADMIN_TOKEN = 24  # characters of $PODPULSE_API_TOKEN; `podpulse token` and the demo make 43
log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Token:
    name: str
    sha256: bytes  # of the token's UTF-8 bytes, hex digits as ASCII
    scopes: frozenset[str]


def write_token_file(token: str, path: Path) -> Path:
    """``token`` in ``path``, readable by this user alone (created 0600, never wider while written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that existed keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def digest(token: bytes) -> bytes:
    return hashlib.sha256(token).hexdigest().encode()


def parse_tokens(doc) -> tuple[Token, ...]:
    """The tokens file's YAML document → tokens, or a ValueError naming the entry and the field."""
    if not isinstance(doc, list):
        raise ValueError("the tokens file must be a YAML list of {name, sha256, scopes}")
    tokens, names = [], set()
    for i, entry in enumerate(doc):
        where = f"entry {i}"
        if not isinstance(entry, dict) or set(entry) != {"name", "sha256", "scopes"}:
            raise ValueError(f"{where}: must have exactly the keys name, sha256, scopes")
        name, sha, scopes = entry["name"], entry["sha256"], entry["scopes"]
        if not isinstance(name, str) or not name or name in names:
            raise ValueError(f"{where}: name must be a unique non-empty string, got {name!r}")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise ValueError(f"{where} ({name}): sha256 must be 64 lowercase hex digits (podpulse token makes it)")
        if not isinstance(scopes, list) or not scopes or not set(map(str, scopes)) <= set(SCOPES):
            raise ValueError(f"{where} ({name}): scopes must be a non-empty list of {', '.join(SCOPES)}, got {scopes!r}")
        names.add(name)
        tokens.append(Token(name, sha.encode(), frozenset(scopes)))
    return tuple(tokens)


def new_token(name: str, scopes: list[str | Scope]) -> tuple[str, dict]:
    """A fresh random token and its tokens-file entry (which holds only its SHA-256)."""
    token = secrets.token_urlsafe(32)
    entry = {"name": name, "sha256": digest(token.encode()).decode(),
             "scopes": sorted({getattr(s, "value", s) for s in scopes})}
    parse_tokens([entry])  # the same checks the replicas make
    return token, entry


def allows(scopes: frozenset[str], scope: str) -> bool:
    """Whether a token of ``scopes`` may do what needs ``scope`` (``admin`` may do everything)."""
    return scope in scopes or Scope.admin.value in scopes


class Tokens:
    """The tokens this process accepts, from the environment and the tokens file, kept current."""

    def __init__(self, env=os.environ, clock=time.monotonic):
        self.env, self.clock = env, clock
        self._lock = threading.Lock()
        self._file: tuple[str, float, tuple[Token, ...]] | None = None  # path, mtime, tokens
        self._checked = -RECHECK_S
        self._error = ""  # the last reason the file could not be read, logged once until it changes
        self._short_said = False
        self._admin: tuple[str, float, float, str | None] | None = None  # path, checked, mtime, token

    def scopes(self, authorization: bytes | None) -> frozenset[str] | None:
        """The scopes of ``Authorization: Bearer <token>``; None when it names no token."""
        found = self.find(authorization)
        return None if found is None else found.scopes

    def find(self, authorization: bytes | None) -> Token | None:
        """The token of ``Authorization: Bearer <token>``; None when it names none. Every known digest
        is compared (in constant time), so the time taken says nothing of which matched."""
        if not authorization or not authorization.startswith(_BEARER):
            return None
        given = digest(authorization[len(_BEARER):])
        found = None
        for token in self._known():
            if hmac.compare_digest(given, token.sha256):
                found = token
        return found

    def _admin_from_file(self, path: str) -> str | None:
        """The admin token in ``path`` (read again when it changes, checked at most once a second)."""
        with self._lock:
            now = self.clock()
            if self._admin is not None and self._admin[0] == path and now - self._admin[1] < RECHECK_S:
                return self._admin[3]
            try:
                mtime = Path(path).stat().st_mtime
                unchanged = self._admin is not None and (self._admin[0], self._admin[2]) == (path, mtime)
                token = self._admin[3] if unchanged else (Path(path).read_text().strip() or None)
            except OSError as e:
                if self._admin is None or self._admin[3] is not None:
                    log.error("API tokens: cannot read $PODPULSE_API_TOKEN_FILE %s (%s)", path, e)
                mtime, token = -1.0, None
            self._admin = (path, now, mtime, token)
            return token

    def _known(self) -> tuple[Token, ...]:
        shared = self.env.get("PODPULSE_API_TOKEN")
        if not shared and self.env.get("PODPULSE_API_TOKEN_FILE"):
            shared = self._admin_from_file(self.env["PODPULSE_API_TOKEN_FILE"])
        if shared and len(shared) < MIN_ADMIN_TOKEN:
            if not self._short_said:
                self._short_said = True
                log.error("API tokens: $PODPULSE_API_TOKEN has %d characters, under %d: refused (make one with "
                          "`podpulse token`)", len(shared), MIN_ADMIN_TOKEN)
            shared = None
        own = (Token("PODPULSE_API_TOKEN", digest(shared.encode()), frozenset({"admin"})),) if shared else ()
        return own + self._from_file()

    def _from_file(self) -> tuple[Token, ...]:
        path = self.env.get("PODPULSE_API_TOKENS_FILE")
        if not path:
            return ()
        with self._lock:
            now = self.clock()
            if self._file is not None and self._file[0] == path and now - self._checked < RECHECK_S:
                return self._file[2]
            self._checked = now
            try:
                mtime = Path(path).stat().st_mtime
                if self._file is None or self._file[:2] != (path, mtime):
                    self._file = (path, mtime, parse_tokens(yaml.safe_load(Path(path).read_text())))
                    self._error = ""
                    log.info("API tokens: %d from %s", len(self._file[2]), path)
                metrics.tokens_file_readable(True)
            except (OSError, ValueError, yaml.YAMLError) as e:
                if str(e) != self._error:  # an optional Secret not created yet: said once, not every second
                    self._error = str(e)
                    log.error("API tokens: cannot read %s (%s); its tokens are refused until it reads", path, e)
                self._file = (path, -1.0, ())
                metrics.tokens_file_readable(False)
            return self._file[2]
