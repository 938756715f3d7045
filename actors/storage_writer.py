"""StorageWriter: the polyglot storage actor.

One actor owns the stores' connections. Consumers call :meth:`Writer.commit`
with a batch and its next offsets; batches that queue up while a write is
running are coalesced and written together in ONE transaction (up to
``max_rows``): fewer, larger commits are what the stores are fast at (measured
on DuckDB: 312k rows/s with 20k-row commits, 435k rows/s with 100k-row ones).

A ``commit`` call returns only when its batch is durable with its offsets. A
call that failed (the writer died, a store raised) may or may not have been
applied: the offsets stored with the data settle that on the next attempt.

Nothing a store says stops the pipeline:

- **A refused value** (:class:`storage.base.RefusedRows`: a data error, not a
  lost connection) would fail every retry, and with it every batch coalesced
  with it. The writer bisects the group with dry runs (each a transaction
  rolled back) down to the rows the store refuses on their own, dead-letters
  exactly those with the store's message (and waits for the broker's
  acknowledgement), then commits the rest with the offsets.
- **A lost connection or a dead database**: the store is opened lazily, on the
  first call that needs it, and dropped after any other failure, so the next
  call reconnects (and re-runs the idempotent migrations). The constructor
  never touches the database: Ray restarts a writer that dies (a constructor
  that raised would never be restarted). Consumers retry with capped backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import numpy as np
import pyarrow as pa
import ray

from actors.config import WRITER_CPUS
from podpulse import metrics
from podpulse.dead_letters import DeadLetter, DeadLetterTopic
from podpulse.failures import FailureLog
from storage.base import OffsetGap, RefusedRows, StorageError
from storage.config import StorageConfig
from storage.rollups import check_follows, drop_replayed
from storage.router import Storage, open_storage

log = logging.getLogger("podpulse.writer")

__all__ = ["StorageWriter", "Writer", "coalesce"]


Batch = tuple[pa.Table, dict[int, int], "dict[int, int | None] | None"]  # rows, next and start offsets


def coalesce(batches: list[Batch]) -> Batch:
    """Concatenate batches in arrival order, keeping each (partition, offset) once.

    After a consumer restart, an old consumer's in-flight batch and the new
    consumer's first batch can cover the same offsets; each batch is filtered
    against the offsets the batches before it reached. A batch that starts past
    what the batches before it reached means one in between is missing: the
    whole group is refused (``OffsetGap``) and its consumers rewind.
    """
    reached: dict[int, int] = {}
    starts: dict[int, int | None] = {}
    tables = []
    for table, next_offsets, start_offsets in batches:
        for p, start in (start_offsets or {}).items():
            if p not in reached:
                starts.setdefault(p, start)
        check_follows(reached, {p: s for p, s in (start_offsets or {}).items() if p in reached})
        fresh, _ = drop_replayed(table, reached)
        tables.append(fresh)
        for p, o in next_offsets.items():
            reached[p] = max(reached.get(p, 0), o)
    return pa.concat_tables(tables), reached, starts if any(b[2] is not None for b in batches) else None


class Writer:
    def __init__(self, config: StorageConfig, max_rows: int = 100_000,
                 dead_letters: DeadLetterTopic | None = None):
        """``dead_letters``: where rows a store refuses go (None: such a batch fails, as before)."""
        self.config = config
        self.storage: Storage | None = None  # opened by the first call that needs it
        self.dead_letters = dead_letters
        self._sink = None
        self.closed = False  # after close(), nothing reopens the store (a late lag poll would)
        self.backend = metrics.backend_label(config)  # the label of its metrics
        self.max_rows = max_rows
        self.pending: list[tuple[str, Batch, asyncio.Future]] = []
        self.flushing: asyncio.Task | None = None
        self.db_lock = asyncio.Lock()  # one store call at a time, off the event loop
        self.failures = FailureLog("writer", log)
        self.stats = {"batches": 0, "transactions": 0, "applied": 0, "replayed": 0, "repeated": 0,
                      "erased": 0, "refused": 0, "write_seconds": 0.0}

    async def commit(self, topic: str, events: pa.Table, next_offsets: dict[int, int],
                     start_offsets: dict[int, int | None] | None = None) -> dict:
        """Durable when it returns: the batch and its offsets, in one transaction.

        ``start_offsets``: the consumer's position before the batch, per partition
        (None: the beginning); a batch that does not follow the stored offsets is refused.
        """
        done = asyncio.get_running_loop().create_future()
        self.pending.append((topic, (events, next_offsets, start_offsets), done))
        if self.flushing is None or self.flushing.done():
            self.flushing = asyncio.create_task(self._flush())
        return await done

    async def _flush(self) -> None:
        while self.pending:
            group = self._take_group()
            topic = group[0][0]
            try:
                async with self.db_lock:
                    result = await asyncio.get_running_loop().run_in_executor(
                        None, self._write, topic, [batch for _, batch, _ in group])
            except Exception as e:  # every batch of the group shares the outcome
                metrics.write_failed(self.backend)
                for _, _, done in group:
                    if not done.done():
                        done.set_exception(e)
                continue
            for _, batch, done in group:
                if not done.done():
                    done.set_result({"rows": batch[0].num_rows, **result})

    def _take_group(self) -> list:
        topic, rows, n = self.pending[0][0], 0, 0
        for t, batch, _ in self.pending:
            if t != topic or (n and rows + batch[0].num_rows > self.max_rows):
                break
            rows += batch[0].num_rows
            n += 1
        group, self.pending = self.pending[:n], self.pending[n:]
        return group

    def _store(self) -> Storage:
        """The open storage, opening it (connect + migrate) if needed."""
        if self.closed:
            raise StorageError("the storage writer is closed")
        if self.storage is None:
            try:
                storage = open_storage(self.config)
                try:
                    storage.setup()
                except BaseException:
                    storage.close()
                    raise
            except StorageError:
                raise
            except Exception as e:  # a driver's connection error: one line, picklable
                raise StorageError(f"cannot open the store: {type(e).__name__}: "
                                   f"{(str(e).strip().splitlines() or [''])[0][:300]}") from e
            self.storage = storage
        return self.storage

    def _drop_store(self) -> None:
        """After a failure that is not about the batch: reconnect on the next call."""
        storage, self.storage = self.storage, None
        if storage is not None:
            try:
                storage.close()
            except Exception:  # already broken: nothing more to release
                pass

    def _write(self, topic: str, batches: list[Batch]) -> dict:
        started = time.perf_counter()
        events, next_offsets, start_offsets = coalesce(batches)
        try:
            storage = self._store()
            try:
                result, refused = storage.commit(topic, events, next_offsets, start_offsets), 0
            except RefusedRows as e:
                rows = self._isolate(storage, topic, events, next_offsets, start_offsets, e)
                keep = np.ones(events.num_rows, dtype=bool)
                keep[rows] = False
                result = storage.commit(topic, events.filter(pa.array(keep)), next_offsets, start_offsets)
                refused = len(rows)
        except Exception as e:
            self.failures.record("write failed", e, f"{topic}, {len(batches)} batches, next offsets {next_offsets}")
            if not isinstance(e, (OffsetGap, RefusedRows)):
                self._drop_store()
            raise
        s = self.stats
        seconds = time.perf_counter() - started
        replayed = result.replayed + sum(b[0].num_rows for b in batches) - events.num_rows
        s["write_seconds"] += seconds
        s["batches"] += len(batches)
        s["transactions"] += 1
        s["applied"] += result.applied
        s["replayed"] += replayed
        s["repeated"] += result.repeated
        s["erased"] += result.erased  # rows of erased devices, dropped
        s["refused"] += refused
        metrics.batch_written(self.backend, seconds, result.applied, replayed)
        return {"transaction_rows": events.num_rows, "applied": result.applied, "refused": refused}

    def _isolate(self, storage: Storage, topic: str, events: pa.Table, next_offsets: dict[int, int],
                 start_offsets, error: RefusedRows) -> list[int]:
        """Find the rows the store refuses on their own (bisection with dry runs) and dead-letter
        them; returns their indices. Raises the store's error if no single row is to blame."""
        if self.dead_letters is None:
            raise error
        refused: list[tuple[int, str]] = []

        def probe(lo: int, hi: int, reason: str | None = None) -> None:
            if reason is None:
                try:
                    storage.commit(topic, events.slice(lo, hi - lo), next_offsets, start_offsets, dry_run=True)
                    return
                except RefusedRows as e:
                    reason = str(e)
            if hi - lo == 1:
                refused.append((lo, reason))
                return
            mid = (lo + hi) // 2
            probe(lo, mid)
            probe(mid, hi)

        probe(0, events.num_rows, str(error))
        if not refused:  # only a combination of rows fails: nothing to isolate
            raise error
        if self._sink is None:
            self._sink = self.dead_letters.sink()
        indices = [i for i, _ in refused]
        rows = events.take(indices)
        self._sink.send([
            DeadLetter(key=d.encode(), value=msgspec.json.encode(r), reason=reason, stage="store", topic=topic,
                       partition=p, offset=o)
            for (_, reason), d, r, p, o in zip(refused, rows["device_id"].to_pylist(), _json_rows(rows),
                                               rows["kafka_partition"].to_pylist(), rows["kafka_offset"].to_pylist())])
        log.warning("%s: the store refused %d of %d rows; dead-lettered them (%s)", topic, len(refused),
                    events.num_rows, refused[0][1][:200])
        metrics.events_dead_lettered(topic, rows["kafka_partition"].to_pylist())
        return indices

    async def committed_offsets(self, topic: str) -> dict[int, int]:
        async with self.db_lock:
            return await asyncio.get_running_loop().run_in_executor(None, self._committed_offsets, topic)

    def _committed_offsets(self, topic: str) -> dict[int, int]:
        if self.closed:  # a status poll racing the shutdown: nothing to say about it
            raise StorageError("the storage writer is closed")
        try:
            return self._store().committed_offsets(topic)
        except Exception as e:
            self.failures.record("reading offsets failed", e)
            self._drop_store()
            raise

    def get_stats(self) -> dict:
        return {**self.stats, "write_seconds": round(self.stats["write_seconds"], 3),
                "failures": dict(self.failures.counts)}

    async def close(self) -> None:
        async with self.db_lock:
            self.closed = True
            self._drop_store()
            if self._sink is not None:
                self._sink.close()


def _json_rows(rows: pa.Table) -> list[dict]:
    """Rows as JSON-ready dicts: times as epoch milliseconds, the Kafka columns left out."""
    out = rows.drop_columns(["kafka_partition", "kafka_offset"])
    ms = out["event_time"].cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64())
    return out.set_column(out.column_names.index("event_time"), "event_time_ms", ms).to_pylist()


# The actor wraps the plain class, so Ray pickles the class by reference (its Kafka
# client types are C types that cannot be pickled by value) and the logic stays testable.
StorageWriter = ray.remote(num_cpus=WRITER_CPUS)(Writer)
