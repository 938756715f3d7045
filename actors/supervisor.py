"""IngestSupervisor: assigns a topic's partitions to PartitionConsumer actors and keeps them running.

- ``assign`` mode (the default): partition ``p`` goes to shard ``p % K``, so the
  same partitions always meet the same consumer slot, with no consumer-group
  join (explicit ``assign()`` starts at once; a group join takes ~20 s on Tansu).
- ``subscribe`` mode: the consumers form one Kafka consumer group (cooperative-
  sticky), and :meth:`Supervisor.scale` adds or removes consumers while running;
  the group moves partitions between them.
- ``writers`` StorageWriter actors (1 by default; DuckDB takes only one): the
  consumer of slot ``i`` writes through writer ``i % writers``, so in
  ``assign`` mode each writer owns a disjoint set of partitions. A commit locks
  its batch's partitions (``storage.commit``), so writers of one topic commit
  side by side and a partition handed over by the group is never written by
  two at once; its offsets stay with its data, so exactly-once holds per
  partition whichever writer stores it.
- It watches every consumer's ``run`` call; when a consumer dies it starts a new
  one for the same shard, which resumes from the offsets stored with the data.
- The StorageWriters are restarted by Ray itself (``max_restarts=-1``; the
  constructor never touches the database, so a restart cannot fail); consumers
  rewind when a write fails. Should a writer still be dead for good, the
  supervisor starts new ones and restarts the consumers on them.
- Every failure is reported by its root cause (Kafka's or the store's own
  words), once per distinct cause, and the run's summary counts them.
- Lag per partition = high watermark − next offset stored with the data.
  "Caught up" is not read from the lag: the embedded broker (Tansu) reports the
  high watermark as the base offset of the last record batch + 1 (seen here: 26
  after 50 records in two batches), so the consumers' end-of-partition events
  decide it instead: caught up when the partitions read to their end, with
  nothing in flight, cover the topic. Apache Kafka's watermarks are exact. The lag is exported as ``podpulse_consumer_lag`` (refreshed at
  least every ``LAG_METRIC_PERIOD_S``), so it under-reads on Tansu too.
"""

from __future__ import annotations

import logging
import threading
import time

import ray
from confluent_kafka import Consumer, TopicPartition
from ray.exceptions import RayActorError, RayTaskError

from actors.config import IngestConfig
from actors.partition_consumer import PartitionConsumer
from actors.storage_writer import StorageWriter
from podpulse import metrics
from podpulse.dead_letters import DeadLetterTopic
from podpulse.errors import BrokerError, ConfigError
from podpulse.failures import FailureLog
from podpulse.kafka import client_config, ensure_topic

__all__ = ["IngestSupervisor", "Supervisor", "shards"]

log = logging.getLogger("podpulse.supervisor")
RESTART_BACKOFF_S = (1.0, 60.0)  # wait before replacing a dead consumer; doubles while it keeps dying
STABLE_AFTER_S = 120.0  # a consumer that ran this long resets its slot's backoff
LAG_METRIC_PERIOD_S = 5.0  # the lag gauge is at most this old while running


def shards(partitions: int, consumers: int) -> list[list[int]]:
    """Partition ``p`` → shard ``p % K``: stable for a given partition count and K."""
    k = max(1, min(consumers, partitions))
    return [[p for p in range(partitions) if p % k == i] for i in range(k)]


class Supervisor:
    def __init__(self, config: IngestConfig):
        self.config = config.with_pseudonym_key()  # every consumer hashes ids with the same key
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.writers: list = []
        self.consumers: list = []
        self.runs: list = []
        self.retired: list = []  # run() refs of consumers removed by scale()
        self.restarts = 0
        self.partitions = 0
        self.failures = FailureLog("supervisor", log)
        self.backoff: dict[int, tuple[float, float]] = {}  # slot → (next wait, when it was last started)
        self.last_lag: dict[int, int] = {}
        self.lag_at = 0.0  # time.monotonic() of the last lag measured
        self._watermarks = Consumer({**client_config(config.bootstrap, config.kafka),
                                     "group.id": f"{config.group_id}-lag"})

    def run(self, until_caught_up: bool = False) -> dict:
        """Ingest until :meth:`stop` (or, with ``until_caught_up``, until every lag is 0)."""
        self._start()
        caught_up_at = None
        exporting = threading.Event()
        exporter = threading.Thread(target=self._export_lag, args=(exporting,), daemon=True)
        exporter.start()
        try:
            while not self._stop.is_set():
                self._watch(timeout=0.5)
                if until_caught_up and self._caught_up():
                    caught_up_at = time.time()
                    break
        finally:
            exporting.set()
            exporter.join()
            final = self._shutdown()
        return final | {"caught_up_at": caught_up_at}

    def stop(self) -> None:
        self._stop.set()

    def scale(self, consumers: int) -> int:
        """Run ``consumers`` consumer actors from now on (``subscribe`` mode): new ones join the
        group, removed ones leave it after their writes land; the group rebalances."""
        if self.config.group_mode != "subscribe":
            raise ConfigError("scaling while running needs --group-mode subscribe")
        if consumers < 1:
            raise ConfigError("keep at least one consumer")
        with self._lock:
            while len(self.consumers) < consumers:
                self.consumers.append(self._spawn(None, len(self.consumers)))
                self.runs.append(self.consumers[-1].run.remote())
            while len(self.consumers) > consumers:
                actor, run = self.consumers.pop(), self.runs.pop()
                actor.stop.remote()
                self.retired.append((actor, run))
        return len(self.consumers)

    # -- what tests and the CLI look at ------------------------------------------
    @property
    def writer(self):
        """The first writer: any of them reads the offsets stored with the data."""
        return self.writers[0] if self.writers else None

    def handles(self) -> dict:
        with self._lock:
            return {"writer": self.writer, "writers": list(self.writers), "consumers": list(self.consumers)}

    def status(self) -> dict:
        lag = self.lag() if self.writer is not None else {}
        return {"partitions": self.partitions, "consumers": len(self.consumers),
                "restarts": self.restarts, "lag": lag, "total_lag": sum(lag.values())}

    def lag(self) -> dict[int, int]:
        try:
            stored = ray.get(self.writer.committed_offsets.remote(self.config.topic), timeout=30)
        except ray.exceptions.RayError:
            return dict(self.last_lag)  # the writer is restarting or closing: the last we knew
        lag = {}
        for p in range(self.partitions):
            low, high = self._watermarks.get_watermark_offsets(
                TopicPartition(self.config.topic, p), timeout=10)
            lag[p] = max(0, high - max(stored.get(p, low), low))
        self.last_lag, self.lag_at = lag, time.monotonic()
        metrics.consumer_lag(self.config.topic, lag)
        return lag

    # -- internals ------------------------------------------------------------------
    def _export_lag(self, done: threading.Event) -> None:
        """Keep the lag gauge fresh when no one polls :meth:`status` (which measures it too)."""
        while not done.wait(LAG_METRIC_PERIOD_S / 2):
            if time.monotonic() - self.lag_at >= LAG_METRIC_PERIOD_S:
                try:
                    self.lag()
                except Exception as e:  # the broker is unreachable: try again next period
                    log.warning("lag not measured: %s", e)

    def _start(self) -> None:
        cfg = self.config
        topic = self._watermarks.list_topics(cfg.topic, timeout=15).topics.get(cfg.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise BrokerError(f"topic {cfg.topic!r} not found on {cfg.bootstrap}")
        self.partitions = len(topic.partitions)
        ensure_topic(client_config(cfg.bootstrap, cfg.kafka), cfg.dead_letter_topic,
                     cfg.dlq_partitions or self.partitions, replication=cfg.dlq_replication)
        self.writers = [self._spawn_writer() for _ in range(cfg.writers)]
        k = cfg.consumers or int(ray.cluster_resources().get("CPU", 1))
        group = cfg.group_mode == "subscribe"
        with self._lock:
            for i, shard in enumerate([None] * k if group else shards(self.partitions, k)):
                self.consumers.append(self._spawn(shard, i))
                self.runs.append(self.consumers[-1].run.remote())

    def _spawn_writer(self):
        cfg = self.config
        return StorageWriter.options(max_restarts=-1, max_task_retries=0).remote(
            cfg.storage, dead_letters=DeadLetterTopic(cfg.bootstrap, cfg.dead_letter_topic, cfg.kafka))

    def _writers_alive(self) -> bool:
        """False only when Ray says a writer is dead for good (not while it restarts)."""
        for writer in self.writers:
            try:
                ray.get(writer.get_stats.remote(), timeout=30)
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                pass  # restarting, or busy writing
            except RayActorError:
                return False
        return True

    def _replace_writers(self) -> None:
        """A writer Ray will not restart: start new ones and the consumers again on them."""
        with self._lock:
            for writer in self.writers:
                ray.kill(writer, no_restart=True)
            self.writers = [self._spawn_writer() for _ in range(self.config.writers)]
            for i, c in enumerate(self.consumers):
                ray.kill(c)
                shard = None if self.config.group_mode == "subscribe" else shards(self.partitions, len(self.consumers))[i]
                self.consumers[i] = self._spawn(shard, i)
                self.runs[i] = self.consumers[i].run.remote()
            self.restarts += 1

    def _spawn(self, shard: list[int] | None, slot: int):
        return PartitionConsumer.options(scheduling_strategy="SPREAD").remote(
            self.config, shard, self.writers[slot % len(self.writers)])

    def _watch(self, timeout: float) -> None:
        with self._lock:
            runs = list(self.runs)
        done, _ = ray.wait(runs, num_returns=1, timeout=timeout)
        for ref in done:
            with self._lock:
                if ref not in self.runs:
                    continue  # removed by scale() meanwhile
                i = self.runs.index(ref)
            try:
                ray.get(ref)
                if not self._stop.is_set():
                    log.warning("consumer %d returned without being stopped; restarting it", i)
            except (RayActorError, RayTaskError) as e:
                self.failures.record("consumer failed", e, f"consumer {i}; restarting it")
            if self._stop.is_set():
                continue
            if not self._writers_alive():
                log.warning("a storage writer is dead for good; starting new ones")
                self._replace_writers()
                continue
            if self._stop.wait(self._restart_wait(i)):
                continue
            shard = None if self.config.group_mode == "subscribe" else shards(self.partitions, len(self.consumers))[i]
            with self._lock:
                ray.kill(self.consumers[i])
                self.consumers[i] = self._spawn(shard, i)
                self.runs[i] = self.consumers[i].run.remote()
                self.restarts += 1

    def _restart_wait(self, slot: int) -> float:
        """Seconds to wait before replacing the consumer of ``slot``: doubling (to a cap) while it
        dies soon after each start, so a consumer that cannot run never spins."""
        wait, started = self.backoff.get(slot, (RESTART_BACKOFF_S[0], 0.0))
        if time.monotonic() - started > STABLE_AFTER_S:
            wait = RESTART_BACKOFF_S[0]
        self.backoff[slot] = (min(wait * 2, RESTART_BACKOFF_S[1]), time.monotonic() + wait)
        return wait

    def _caught_up(self) -> bool:
        """Every partition read to its end by its current owner, with nothing in flight."""
        try:
            ended = ray.get([c.caught_up.remote() for c in self.consumers], timeout=60)
        except ray.exceptions.RayError:
            return False  # a consumer is restarting
        if any(e is None for e in ended):
            return False
        return {p for e in ended for p in e} == set(range(self.partitions))

    def _shutdown(self) -> dict:
        for c in self.consumers:
            c.stop.remote()
        stats = []
        for ref in [*self.runs, *(run for _, run in self.retired)]:
            try:
                stats.append(ray.get(ref, timeout=120))
            except (RayActorError, RayTaskError) as e:
                self.failures.record("consumer failed at shutdown", e)
        lag = self.lag()
        per_writer = []
        for writer in self.writers:
            try:
                per_writer.append(ray.get(writer.get_stats.remote(), timeout=60))
                ray.get(writer.close.remote(), timeout=60)
            except ray.exceptions.RayError as e:
                self.failures.record("writer failed at shutdown", e)
        writer_stats = _summed(per_writer)
        for c in [*self.consumers, *(actor for actor, _ in self.retired)]:
            ray.kill(c)
        for writer in self.writers:
            ray.kill(writer, no_restart=True)
        self._watermarks.close()
        return {
            "partitions": self.partitions, "consumers": len(self.consumers), "restarts": self.restarts,
            "consumed": sum(s["consumed"] for s in stats),
            "dead_lettered": sum(s["dead_lettered"] for s in stats),
            "assigned": sum(s["assigned"] for s in stats),  # partitions handed over by the group
            "rewinds": sum(s["rewinds"] for s in stats),  # after a failed write
            "writer": writer_stats, "writers": per_writer, "lag": lag,
            "failures": _merged([self.failures.counts, writer_stats.get("failures", {}),
                                 *(s.get("failures", {}) for s in stats)]),
        }


def _summed(stats: list[dict]) -> dict:
    """The writers' stats added up (their failures merged); {} when none answered."""
    out: dict = {}
    for s in stats:
        for key, value in s.items():
            if key == "failures":
                out[key] = _merged([out.get(key, {}), value])
            elif isinstance(value, (int, float)):
                out[key] = out.get(key, 0) + value
    return out


def _merged(tallies) -> dict[str, int]:
    """Failure counts of every component, by "what: root cause"."""
    out: dict[str, int] = {}
    for tally in tallies:
        for key, n in tally.items():
            out[key] = out.get(key, 0) + n
    return out


# The actor wraps the plain class, so Ray pickles the class by reference (its Kafka
# client types are C types that cannot be pickled by value) and the logic stays testable.
IngestSupervisor = ray.remote(num_cpus=0, max_concurrency=4)(Supervisor)
