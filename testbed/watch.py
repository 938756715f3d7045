"""A thread polling the offsets stored with the data: how much of a topic is stored, and when all of it
first was. What the fault matrix and the fault tests measure recovery by."""

from __future__ import annotations

import threading
import time
from typing import Callable

import ray

from storage.config import StorageConfig
from storage.reader import ReaderPool, committed_offsets

__all__ = ["Watch", "writer_offsets", "store_offsets", "POLL_S"]

POLL_S = 0.1


def writer_offsets(supervisor, topic: str) -> Callable[[], dict | None]:
    """The offsets stored with the data, through the supervisor's (current) writer: a DuckDB file
    its writer holds can be read no other way. None while that is not known (restarting, store down)."""
    def read():
        try:
            writer = ray.get(supervisor.handles.remote(), timeout=5)["writer"]
            return None if writer is None else ray.get(writer.committed_offsets.remote(topic), timeout=5)
        except Exception:  # restarting, store down: not known now
            return None
    return read


def store_offsets(storage: StorageConfig, topic: str) -> Callable[[], dict | None]:
    """The offsets stored with the data, read from a server store directly (one pooled connection);
    None while the store cannot be read. ``read.close()`` releases the connection."""
    pool = ReaderPool(storage, size=1, wait_s=5)

    def read():
        try:
            return committed_offsets(pool, topic)
        except Exception:  # the store restarting or down: not known now
            return None
    read.close = pool.close
    return read


class Watch:
    """Polls the stored offsets every :data:`POLL_S`: how much is stored, and when everything first was."""

    def __init__(self, offsets: Callable[[], dict | None], ends: dict[int, int]):
        self.offsets = offsets
        self.stored = 0
        self.complete_at: float | None = None
        self._lock = threading.Lock()
        self.extend(ends)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def extend(self, ends: dict[int, int]) -> None:
        """The topic grew: everything is stored once these offsets are."""
        with self._lock:
            self.ends = {p: o for p, o in ends.items() if o}
            self.total = sum(self.ends.values())
            self.complete_at = None

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self.offsets()
            if got is not None:
                with self._lock:
                    self.stored = sum(min(got.get(p, 0), end) for p, end in self.ends.items())
                    if self.stored == self.total and self.complete_at is None:
                        self.complete_at = time.time()
            self._stop.wait(POLL_S)

    def wait(self, share: float, timeout: float, done=None) -> bool:
        """Until ``share`` of the records is stored (or the run ``done``, a Ray object ref, ended)."""
        deadline = time.monotonic() + timeout
        while self.stored < share * self.total:
            if time.monotonic() > deadline or (done is not None and ray.wait([done], timeout=0)[0]):
                return self.stored >= share * self.total
            time.sleep(0.02)
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        close = getattr(self.offsets, "close", None)
        if close:
            close()
