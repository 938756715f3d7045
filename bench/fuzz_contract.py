"""Fuzz the event decoder: coverage-guided bytes from atheris (libFuzzer) into ``decode_batch``.

Each input is decoded twice: as one message value, and split on newlines into a
small batch (at most 16 values; an empty line at an odd position stands for a
missing value, ``None``). The batch also varies what comes with it, by the
input's length: no Kafka timestamps; now for all (every third one unknown);
timestamps read from the values' first 8 bytes (any int64, so negative and
huge ones too); or no event-time window.

Every call must return a row or a reason for each value, never raise:
``table rows + rejects == values``, the indices of both cover the batch
exactly once, and the table has the contract's schema. The first input that
breaks this is printed (``repr``) with the traceback and saved to a file, and
the script exits 1. Otherwise it stops after ``--runs`` inputs, exit 0, with a
summary (runs, seconds, values per second). The process grows (~1.1 GB after
200,000 inputs): that is atheris/libFuzzer's bookkeeping, the decoder alone
stays flat.

The fuzzer starts from a seed corpus of valid events (v1, v2, v3, a batch of
them) and nasty ones: deep nesting, huge integers, NUL bytes, lone surrogates
(escaped and raw), huge strings, out-of-window times, broken UTF-8 and JSON.

    python bench/fuzz_contract.py --runs 200000 --json
    python bench/fuzz_contract.py --replay FILE...   # decode saved inputs once, same checks

Needs atheris (``pip install -e .[dev]``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from anywhere

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

try:
    import atheris
except ImportError:  # pragma: no cover - reported by main()
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["podpulse"]):  # coverage feedback from PodPulse's code only
        from podpulse.contract import ARROW_SCHEMA, DEFAULT_WINDOW, DEVICE_FIELDS, decode_batch
else:  # pragma: no cover
    from podpulse.contract import ARROW_SCHEMA, DEFAULT_WINDOW, DEVICE_FIELDS, decode_batch

MAX_BATCH = 16
DAY_MS = 86_400_000


class Broken(Exception):
    """decode_batch returned something that breaks its promise."""


def batch_of(data: bytes, now_ms: int):
    """The batch, its Kafka timestamps and window for one fuzz input."""
    parts: list[bytes | None] = list(data.split(b"\n", MAX_BATCH - 1))
    parts = [None if not p and i % 2 else p for i, p in enumerate(parts)]
    scheme = len(data) % 4
    received, window = None, DEFAULT_WINDOW
    if scheme == 1:
        received = np.array([0 if i % 3 == 2 else now_ms for i in range(len(parts))], dtype=np.int64)
    elif scheme == 2:
        received = [int.from_bytes((p or b"")[:8].ljust(8, b"\0"), "little", signed=True) for p in parts]
    elif scheme == 3:
        window = None
    return parts, received, window


def check(values, received=None, window=DEFAULT_WINDOW) -> None:
    decoded = decode_batch(values, received_ms=received, window=window)
    n, rows = len(values), decoded.rows.tolist()
    if len(rows) != decoded.table.num_rows or len(decoded.samples) != len(rows):
        raise Broken(f"{len(rows)} row positions for {decoded.table.num_rows} rows")
    covered: dict[int, list[int]] = {}  # per value: -1 (an event or the whole value) or its samples' indexes
    for i, k in zip(rows, decoded.samples.tolist()):
        covered.setdefault(i, []).append(k)
    for r in decoded.rejected:
        covered.setdefault(r.index, []).append(-1 if r.sample is None else r.sample)
    for i in range(n):
        seen = sorted(covered.pop(i, []))
        if seen != [-1] and (not seen or seen != list(range(len(seen)))):
            raise Broken(f"value {i} is covered by {seen}: not once as a whole, nor once per sample")
    if covered:
        raise Broken(f"rows or rejects for values that do not exist: {sorted(covered)}")
    if decoded.table.schema != ARROW_SCHEMA:
        raise Broken(f"table schema {decoded.table.schema} is not the contract's")
    if not all(isinstance(r.reason, str) and r.reason for r in decoded.rejected):
        raise Broken(f"a reject without a reason: {decoded.rejected}")


def seeds(now_ms: int) -> list[bytes]:
    """Valid events and nasty variations of them."""
    good = dict(schema_version=2, device_id="ap-0011223344556677", seq=3, event_time_ms=now_ms - 3_600_000,
                model="AirPods Pro 2", firmware="7A294", battery_left=80, battery_right=79, battery_case=50,
                charging="none", in_ear_left=True, in_ear_right=True, noise_mode="anc", playback_s=250.0,
                output_dba=70.5, ambient_dba=62.0, postcode="2000", host_device="iphone", interval_s=300,
                temp_left_c=32.1, temp_right_c=32.0, conversation_awareness=True)
    v1 = {k: v for k, v in good.items() if k not in ("interval_s", "temp_left_c", "temp_right_c",
                                                        "conversation_awareness")} | {"schema_version": 1}
    v3 = good | {"schema_version": 3, "spatial_audio": True}

    def enc(record: dict) -> bytes:
        return msgspec.json.encode(record)

    valid = [enc(good), enc(v1), enc(v3), enc(good | {"schema_version": 7, "new_field": [1, {"a": None}]})]
    body = enc(good)[:-1]
    envelope = {k: v for k, v in v3.items() if k in DEVICE_FIELDS}
    sample = {k: v for k, v in v3.items() if k not in DEVICE_FIELDS}
    valid.append(enc(envelope | {"samples": [sample | {"seq": s} for s in range(5)]}))  # a device upload
    nasty = [
        enc(envelope | {"samples": [sample, sample | {"battery_left": 101}, 7, None, sample | {"model": "x"}]}),
        enc(envelope | {"samples": []}), enc(envelope | {"samples": {"seq": 1}}), enc({"samples": [sample]}),
        enc(envelope | {"seq": 4, "samples": [sample]}), enc(envelope | {"samples": [sample] * 1001}),
        enc(envelope | {"postcode": "0001", "samples": [sample, sample]}),
        b"\n".join(valid),  # a batch of valid events
        b"\n".join([valid[0], b"", b"{", valid[1], b"null", valid[2]]),
        body + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deep nesting
        b"[" * 10_000,
        b'{"a":' * 3000 + b"1" + b"}" * 3000,
        enc(good | {"seq": 2**63}), enc(good | {"seq": 10**30}), enc(good | {"event_time_ms": 2**64}),
        body + b', "battery_left": 1' + b"0" * 400 + b"}",  # huge int literal, duplicate key
        enc(good | {"playback_s": 1e308}), body.replace(b"250.0", b"1e999") + b"}", body + b', "n": NaN}',
        enc(good | {"model": "AirPods\x00Pro"}), body + b', "host_device": "a\x00b"}',  # NUL, escaped and raw
        enc(good | {"firmware": "LONE"}).replace(b"LONE", b"\\ud800"),  # lone surrogate, escaped
        enc(good | {"firmware": "LONE"}).replace(b"LONE", b"\xed\xa0\x80"),  # and raw (invalid UTF-8)
        enc(good | {"note": "\\udc00\\ud800"}),
        enc(good | {"model": "x" * 5000}), body + b', "note": "' + b"x" * 6000 + b'"}',  # huge strings
        enc(good | {"event_time_ms": 4_070_908_800_000}),  # 2099: outside the window
        enc(good | {"event_time_ms": now_ms - 61 * DAY_MS}), enc(good | {"event_time_ms": 1_572_393_600_000}),
        enc(good | {"schema_version": 3}), enc(good | {"postcode": "0001"}), enc(good | {"playback_s": 301.0}),
        b"", b"null", b"[]", b"{}", b"\xff\xfe", enc(good)[:-7], b"\x00\x01 not json ", b'"\\u0000"',
    ]
    return valid + nasty


def save(data: bytes, crash_dir: Path) -> Path:
    crash_dir.mkdir(parents=True, exist_ok=True)
    path = crash_dir / f"fuzz-contract-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


class Target:
    """The fuzz target: counts runs and values, stops the process after ``runs`` inputs."""

    def __init__(self, runs: int, as_json: bool, crash_dir: Path, corpus: Path | None = None) -> None:
        self.runs, self.as_json, self.crash_dir, self.corpus = runs, as_json, crash_dir, corpus
        self.done = self.values = 0
        self.started = time.perf_counter()
        self.now_ms = time.time_ns() // 1_000_000

    def __call__(self, data: bytes) -> None:
        call = ([data], None, DEFAULT_WINDOW)
        try:
            check(*call)
            call = batch_of(data, self.now_ms)
            check(*call)
        except Exception as e:
            self.fail(data, call, e)
        self.values += 1 + len(call[0])
        self.done += 1
        if self.done >= self.runs:
            self.finish(0)

    def summary(self, **extra) -> dict:
        seconds = time.perf_counter() - self.started
        return {"runs": self.done, "values": self.values, "seconds": round(seconds, 3),
                "runs_per_s": round(self.done / seconds) if seconds else None,
                "values_per_s": round(self.values / seconds) if seconds else None, **extra}

    def fail(self, data: bytes, call, error: Exception) -> None:
        path = save(data, self.crash_dir)
        values, received, window = call
        print(f"\nFUZZ FAILURE after {self.done} runs: {type(error).__name__}: {error}\n"
              f"input: {data!r}\nvalues: {values!r}\nreceived_ms: {received!r}\nwindow: {window!r}\n"
              f"saved: {path}\n"
              f"replay: python bench/fuzz_contract.py --replay {path}", file=sys.stderr)
        traceback.print_exception(error, file=sys.stderr)
        self.finish(1, failures=1, error=f"{type(error).__name__}: {error}", input=repr(data), saved=str(path))

    def finish(self, code: int, **extra) -> None:
        result = self.summary(failures=extra.pop("failures", 0), **extra)
        if self.as_json:
            print(json.dumps(result))
        else:
            print(f"{'FAILED' if code else 'ok'}: {result['runs']:,} runs, {result['values']:,} values "
                  f"in {result['seconds']} s ({result['values_per_s']:,} values/s)")
        sys.stdout.flush()
        sys.stderr.flush()
        if self.corpus is not None:
            shutil.rmtree(self.corpus, ignore_errors=True)
        os._exit(code)  # libFuzzer would otherwise go on: there is no clean way out of atheris.Fuzz()


def replay(paths: list[str]) -> int:
    now_ms = time.time_ns() // 1_000_000
    for name in paths:
        data = Path(name).read_bytes()
        try:
            check([data])
            check(*batch_of(data, now_ms))
        except Exception:
            print(f"{name}: FAILS\ninput: {data!r}", file=sys.stderr)
            traceback.print_exc()
            return 1
        print(f"{name}: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200_000, help="inputs to try (default 200,000)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed (default 1)")
    parser.add_argument("--max-len", type=int, default=12_000, help="longest generated input, bytes")
    parser.add_argument("--crash-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where a failing input is saved (default: the temp directory)")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="decode saved inputs once and exit")
    args = parser.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    if atheris is None:
        print("atheris is not installed: pip install -e .[dev]  (or pip install atheris)", file=sys.stderr)
        return 2
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    args.crash_dir.mkdir(parents=True, exist_ok=True)
    corpus = Path(tempfile.mkdtemp(prefix="podpulse-fuzz-corpus-"))  # libFuzzer adds to it; removed at the end
    target = Target(args.runs, args.json, args.crash_dir, corpus)
    for i, seed in enumerate(seeds(target.now_ms)):
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    libfuzzer = [sys.argv[0], f"-seed={args.seed}", f"-max_len={args.max_len}", "-timeout=60",
                 "-rss_limit_mb=4096", f"-artifact_prefix={args.crash_dir}/", str(corpus)]
    atheris.Setup(libfuzzer, target)
    atheris.Fuzz()  # returns only through Target.finish
    return 3  # pragma: no cover - libFuzzer stopped on its own (it prints why)


if __name__ == "__main__":
    sys.exit(main())
