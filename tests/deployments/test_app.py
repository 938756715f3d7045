"""The Serve application started for real (Ray Serve, TensorFlow models, DuckDB), over HTTP."""

import json
import math
import re
import threading
import time
import uuid
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import pytest
import requests
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.tokens import new_token
from jobs.train import train_battery_anomaly
from podpulse.broker import free_port
from podpulse.contract import DEVICE_FIELDS
from podpulse.privacy import MIN_K
from storage.config import StorageConfig
from storage.reader import run_queries
from testbed.api import AGGREGATES, ANALYST, AUTH, INGEST, ROW, TOKEN, token_env


def event(device_id: str = "ap-0011223344556677", **changes) -> dict:
    """One valid telemetry event, timed now (the contract refuses events weeks old)."""
    return {"schema_version": 1, "device_id": device_id, "seq": 1, "event_time_ms": int(time.time() * 1000),
            "model": "AirPods Pro", "firmware": "6F29", "battery_left": 80, "battery_right": 79,
            "battery_case": 50, "charging": "none", "in_ear_left": True, "in_ear_right": True,
            "noise_mode": "anc", "playback_s": 250.0, "output_dba": 70.5, "ambient_dba": 62.0,
            "postcode": "2000", "host_device": "iphone", **changes}


def read_topic(bootstrap: str, topic: str, wanted: set[bytes], timeout: float = 20.0) -> list[tuple[bytes, bytes]]:
    """Every ``(key, value)`` of ``topic`` from its start: read until the keys in ``wanted`` have all
    been seen and a further poll comes back empty (a duplicate would be read by then), or ``timeout``."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "log_level": 0})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, 0.5)
            for m in batch:
                assert m.error() is None, m.error()
                got.append((m.key(), m.value()))
            if not batch and wanted <= {k for k, _ in got}:
                break
        return got
    finally:
        consumer.close()


def test_every_endpoint_answers(served, broker):
    url, *_ = served
    assert requests.get(f"{url}/healthz").json() == {"status": "ok"}
    answer = requests.post(f"{url}/v1/battery/score", json={"rows": [ROW, dict(ROW, drain_left_pct=60.0)]},
                           headers=AUTH)
    assert answer.status_code == 200, answer.text
    scored = answer.json()
    assert len(scored["scores"]) == 2
    assert scored["scores"][1]["departure"] > scored["scores"][0]["departure"]
    trend = requests.get(f"{url}/v1/analytics/usage_trend", headers=AUTH).json()
    assert trend["name"] == "usage_trend" and trend["rows"]
    device = trend and requests.get(f"{url}/v1/analytics/battery_health", headers=AUTH).json()
    some = device["extra"]["outliers"][0]["device_id"]
    health = requests.get(f"{url}/v1/devices/{some}/battery-health", headers=AUTH).json()
    assert health["device_id"] == some and health["days"]
    forecast = requests.get(f"{url}/v1/forecast/usage", params={"region": "NSW-urban"}, headers=AUTH).json()
    assert len(forecast["days"]) == 7 and all(d["listening_hours"] >= 0 for d in forecast["days"])
    segments = requests.get(f"{url}/v1/segments", headers=AUTH).json()
    assert segments["version"] and segments["k"] == 5 and len(segments["segments"]) == segments["evaluation"]["k"]
    assert sum(s["share"] for s in segments["segments"]) == pytest.approx(1.0)
    assert segments["by_region"] and all(r["devices"] >= 5 for r in segments["by_region"])
    none = requests.get(f"{url}/v1/firmware/regressions", headers=AUTH).json()  # podpulse detect never ran here
    assert none["findings"] == [] and none["detected_at"] is None and "podpulse detect" in none["note"]
    good = event()
    answer = requests.post(f"{url}/v1/telemetry", json={"events": [good, dict(good, battery_left=300)]},
                           headers=AUTH)
    assert answer.status_code == 202
    body = answer.json()
    assert body["accepted"] == 1 and body["rejected"] == 1 and "battery_left" in body["reasons"][0]["reason"]


def test_the_admin_token_is_in_no_log_of_ray(served):
    """The replicas read it from a file ($PODPULSE_API_TOKEN_FILE): a runtime_env's variables are written
    to Ray's logs (runtime_env_agent.log and others), which any user of the machine may read."""
    import ray

    url = served[0]
    assert requests.get(f"{url}/v1/analytics/state_overview", headers=AUTH, timeout=60).status_code == 200
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [f for f in logs.rglob("*") if f.is_file()]
    assert files and not [f.name for f in files if TOKEN.encode() in f.read_bytes()]


def test_a_202_means_the_accepted_events_are_in_the_topic(served, broker):
    url, *_ = served
    run = uuid.uuid4().hex[:12]
    sent = [event(f"ap-{run}-{i}", seq=i + 1) for i in range(3)]
    refused = event(f"ap-{run}-bad", battery_left=300)
    answer = requests.post(f"{url}/v1/telemetry", json={"events": [sent[0], refused, *sent[1:]]}, headers=AUTH)
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == 3 and answer.json()["rejected"] == 1
    keys = {e["device_id"].encode() for e in sent}
    ours = [(k, json.loads(v)) for k, v in read_topic(broker.bootstrap, "serve-telemetry", keys)
            if k and k.decode().startswith(f"ap-{run}-")]
    # each accepted event once, keyed by its device, as sent; the refused one not at all
    assert sorted(ours, key=lambda kv: kv[0]) == [(e["device_id"].encode(), e) for e in sent], ours


def test_an_upload_goes_to_the_topic_cut_down_to_its_accepted_samples(served, broker):
    url, *_ = served
    run = uuid.uuid4().hex[:12]
    whole = [event(f"ap-{run}-up", seq=i + 1) for i in range(4)]
    envelope = {k: v for k, v in whole[0].items() if k in DEVICE_FIELDS}
    samples = [{k: v for k, v in e.items() if k not in DEVICE_FIELDS} for e in whole]
    samples[2]["battery_left"] = 300
    single = event(f"ap-{run}-one", seq=1)
    answer = requests.post(f"{url}/v1/telemetry", json={"events": [envelope | {"samples": samples}, single]},
                           headers=AUTH)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["accepted"] == 4 and body["rejected"] == 1
    assert body["reasons"][0]["index"] == 0 and body["reasons"][0]["sample"] == 2
    assert "$.samples[2].battery_left" in body["reasons"][0]["reason"]
    keys = {f"ap-{run}-up".encode(), f"ap-{run}-one".encode()}
    ours = sorted(((k, json.loads(v)) for k, v in read_topic(broker.bootstrap, "serve-telemetry", keys)
                   if k and k.decode().startswith(f"ap-{run}-")), key=lambda kv: kv[0])
    # the event as sent; the upload once, with its envelope and the three good samples in order
    assert ours == [(f"ap-{run}-one".encode(), single),
                    (f"ap-{run}-up".encode(), envelope | {"samples": samples[:2] + samples[3:]})], ours


def flagged_by_region_in_the_store(path, version: str) -> dict[str, int]:
    """Distinct devices ``version`` flagged per region, read straight from ``anomalies`` and ``devices``;
    regions of fewer than MIN_K devices are not published."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        flagged = {d for (d,) in con.execute("SELECT device_id FROM anomalies WHERE model_version = ? AND flagged",
                                             [version]).fetchall()}
        region = {d: f"{s}-{'urban' if u else 'rural'}"
                  for d, s, u in con.execute("SELECT device_id, state, urban FROM devices").fetchall()}
    finally:
        con.close()
    size = Counter(region.values())
    counts: dict[str, int] = {}
    for d in flagged:
        if size[region[d]] >= MIN_K:
            counts[region[d]] = counts.get(region[d], 0) + 1
    return counts


def exported(text: str, name: str) -> list[dict]:
    """The samples of ``name`` in a Prometheus text exposition: labels and value."""
    out = []
    for line in text.splitlines():
        m = re.fullmatch(name + r"\{(.*)\} (\S+)", line)
        if m:
            out.append({**dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1))), "value": float(m.group(2))})
    return out


def test_replicas_export_scoring_latency_and_the_served_version(served):
    """Through Ray's metrics endpoint of the node, as Prometheus scrapes it."""
    import ray

    url, root, _, _, first = served
    for _ in range(5):
        requests.post(f"{url}/v1/battery/score", json={"rows": [ROW]}, headers=AUTH).raise_for_status()
    # the served version's flagged devices per region, as training left them in the store
    expected = flagged_by_region_in_the_store(root / "s.duckdb", first["version"])
    assert expected and sum(expected.values()) <= first["flagged_devices"], (expected, first)
    assert all(re.fullmatch(r"[A-Z]{2,3}-(urban|rural)", r) for r in expected), expected
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, text, anomalous = time.monotonic() + 30, "", {}
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        count = [line for line in text.splitlines() if line.startswith("ray_podpulse_scoring_latency_seconds_count")
                 and 'endpoint="/v1/battery/score"' in line]
        anomalous = {s["region"]: s["value"] for s in exported(text, "ray_podpulse_anomalous_devices")
                     if s["model"] == "battery-anomaly" and s["version"] == first["version"]}
        if (count and sum(float(line.rsplit(" ", 1)[1]) for line in count) >= 5 and "ray_podpulse_model_info" in text
                and anomalous):
            break
        time.sleep(1)
    assert count and sum(float(line.rsplit(" ", 1)[1]) for line in count) >= 5, text[-2000:]
    assert any(line.startswith("ray_podpulse_model_info") and line.endswith(" 1.0") for line in text.splitlines()
               if "version=" in line), [line for line in text.splitlines() if "model_info" in line]
    assert anomalous == {region: float(n) for region, n in expected.items()}, (anomalous, expected)


def test_replicas_compute_the_served_versions_feature_drift_on_their_schedule(served):
    """The drift gauge, set by the replica's first scheduled run (at start-up), equals the PSI computed here
    from the same store for the version the replica serves: the registry's latest when the test begins."""
    import ray

    from analytics.registry import latest
    from jobs.drift import served_drift

    url, root, storage, _, first = served
    entry = latest(storage, "battery-anomaly")
    expected = served_drift(storage, entry["metadata"])["features"]
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, drift = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        drift = {s["feature"]: s["value"] for s in exported(text, "ray_podpulse_feature_drift_psi")
                 if s["model"] == "battery-anomaly" and s["version"] == entry["version"]}
        if set(drift) == set(expected):
            break
        time.sleep(1)
    assert drift == pytest.approx(expected, rel=1e-9, abs=1e-12), (drift, expected)


def test_a_missing_token_gets_401_and_a_malformed_body_422_naming_the_field(served):
    url, *_ = served
    assert requests.post(f"{url}/v1/battery/score", json={"rows": [ROW]}).status_code == 401
    assert requests.get(f"{url}/v1/analytics/usage_trend", headers={"Authorization": "Bearer nope"}).status_code == 401
    bad = requests.post(f"{url}/v1/battery/score", json={"rows": [dict(ROW, anc="lots")]}, headers=AUTH)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"][-1] == "anc"
    too_many = requests.post(f"{url}/v1/battery/score", json={"rows": [ROW] * 1001}, headers=AUTH)
    assert too_many.status_code == 422
    quoted = requests.get(f"{url}/v1/devices/x' OR '1'='1/battery-health", headers=AUTH)
    assert quoted.status_code == 422 and quoted.json()["detail"][0]["loc"][-1] == "device_id"


def test_a_new_model_version_is_swapped_in_without_a_failed_request(served):
    from ray import serve

    from deployments.app import build

    url, root, storage, settings, first = served
    second = train_battery_anomaly(storage, registry=root / "models", epochs=1)
    results, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            r = requests.post(f"{url}/v1/battery/score", json={"rows": [ROW]}, headers=AUTH, timeout=30)
            results.append((r.status_code, r.json().get("version") if r.status_code == 200 else r.text))

    thread = threading.Thread(target=hammer)
    thread.start()
    time.sleep(1.0)
    serve.run(build(**settings, model_path=second["path"]), name="podpulse", route_prefix="/")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not results or results[-1][1] != second["version"]):
        time.sleep(0.2)
    time.sleep(0.5)
    stop.set()
    thread.join()
    assert all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:3]
    versions = [v for _, v in results]
    assert first["version"] in versions and versions[-1] == second["version"]
    # reconfigure set the new version's gauge from the store, too
    import ray

    expected = {r: float(n) for r, n in flagged_by_region_in_the_store(root / "s.duckdb", second["version"]).items()}
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, anomalous = time.monotonic() + 30, {}
    while time.monotonic() < deadline and anomalous != expected:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        anomalous = {s["region"]: s["value"] for s in exported(text, "ray_podpulse_anomalous_devices")
                     if s["version"] == second["version"]}
        time.sleep(0.5)
    assert expected and anomalous == expected, (anomalous, expected)


def test_a_canary_version_answers_its_share_of_requests(served):
    from ray import serve

    from deployments.app import build

    url, root, storage, settings, first = served
    canary = train_battery_anomaly(storage, registry=root / "models", epochs=1)
    serve.run(build(**settings, model_path=first["path"], canary_model_path=canary["path"], canary_percent=50),
              name="podpulse", route_prefix="/")
    versions = [requests.post(f"{url}/v1/battery/score", json={"rows": [ROW]}, headers=AUTH).json()["version"]
                for _ in range(120)]
    assert set(versions) == {first["version"], canary["version"]}
    assert 30 <= versions.count(canary["version"]) <= 90  # 50% of 120: more than 5 standard deviations of slack
    serve.run(build(**settings, model_path=first["path"], canary_model_path=canary["path"], canary_percent=0),
              name="podpulse", route_prefix="/")
    versions = {requests.post(f"{url}/v1/battery/score", json={"rows": [ROW]}, headers=AUTH).json()["version"]
                for _ in range(30)}
    assert versions == {first["version"]}


# Kept after test_replicas_export_...: run before it, this test's ~12 s wait made that test fail
# (ray_podpulse_model_info, set once at model load, was gone from the node's export ~25 s later).
def test_an_unreachable_broker_gets_503_with_retry_after_and_nothing_delivered_late(served):
    """Nothing listens on the app's bootstrap port: 503 with Kafka's reason within the delivery timeout.
    Then a broker comes up on that port and the client retries until 202: the topic holds each event
    once, so the events of the 503 were not delivered behind the client's back."""
    from ray import serve

    from deployments.app import build
    from deployments.settings import DELIVERY_WAIT_S
    from podpulse.broker import EmbeddedBroker

    url, _, _, settings, _ = served
    port = free_port()
    serve.run(build(**dict(settings, bootstrap=f"127.0.0.1:{port}", topic="down-telemetry")),
              name="podpulse-down", route_prefix="/down")
    try:
        sent = [event(f"ap-down-{i}", seq=i + 1) for i in range(3)]
        started = time.monotonic()
        answer = requests.post(f"{url}/down/v1/telemetry", json={"events": sent}, headers=AUTH,
                               timeout=DELIVERY_WAIT_S + 30)
        elapsed = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert int(answer.headers["Retry-After"]) > 0
        detail = answer.json()["detail"]
        assert "Kafka did not acknowledge" in detail and "_MSG_TIMED_OUT" in detail, detail  # Kafka's reason
        assert elapsed < DELIVERY_WAIT_S + 3, elapsed

        with EmbeddedBroker(port=port) as broker:
            broker.create_topic("down-telemetry", 2)
            codes, deadline = [], time.monotonic() + 30
            while time.monotonic() < deadline and codes[-1:] != [202]:
                codes.append(requests.post(f"{url}/down/v1/telemetry", json={"events": sent}, headers=AUTH,
                                           timeout=DELIVERY_WAIT_S + 30).status_code)
            assert codes[-1:] == [202] and set(codes) <= {202, 503}, codes
            keys = {e["device_id"].encode() for e in sent}
            got = read_topic(broker.bootstrap, "down-telemetry", keys)
            assert sorted((k, json.loads(v)) for k, v in got) == [(e["device_id"].encode(), e) for e in sent], got
    finally:
        serve.delete("podpulse-down")


def test_the_serve_config_builds_the_application():
    from pathlib import Path

    import yaml

    from deployments.app import api

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "deployments" / "serve-config.yaml").read_text())
    [application] = config["applications"]
    assert application["import_path"] == "deployments.app:api"
    assert {d["name"] for d in application["deployments"]} == {"PodPulseAPI"}
    StorageConfig(**application["args"]["storage"])  # the same structure as a --storage-config file
    assert api(application["args"]) is not None


def test_a_store_that_cannot_be_read_leaves_the_replica_serving(tmp_path, caplog):
    """serving() on a version whose anomalies cannot be counted: logged, not raised."""
    import logging
    from types import SimpleNamespace

    from deployments.errors import log
    from deployments.lifecycle import serving

    log.addHandler(caplog.handler)  # Serve's logger does not propagate to the root one
    try:
        serving(SimpleNamespace(version="20250101T000000000000Z"), StorageConfig.embedded(tmp_path / "none.duckdb"))
    finally:
        log.removeHandler(caplog.handler)
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and caplog.records[0].exc_info
    assert not (tmp_path / "none.duckdb").exists()  # read only: nothing created
    assert "cannot count the devices battery-anomaly 20250101T000000000000Z flagged" in caplog.text


# ---- the registry's table, user_config's batch settings, check_health: each on an application of its own ----

def replicas(app_name: str) -> set[str]:
    """The names of the live replica actors of ``app_name``'s PodPulseAPI (a replaced replica gets a new name)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"{app_name}#PodPulseAPI#" in a["name"]}


def own_app(storage: dict, registry: str, **options):
    """PodPulseAPI with the test's token, ``options`` as Serve's deployment options (user_config, version, ...)."""
    from deployments.app import PodPulseAPI

    return PodPulseAPI.options(
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": token_env(Path(registry).parent)}},
        **options).bind(storage, None, None, registry)


def registered_copy(source, to, version: str, storage: StorageConfig, name: str, edit=lambda meta: None) -> str:
    """``source`` (a saved version's directory) copied to ``to`` as ``version``, registered in ``storage``."""
    import shutil

    from analytics.registry import register

    shutil.copytree(source, to)
    meta = json.loads((to / "metadata.json").read_text())
    meta["version"] = version
    edit(meta)
    (to / "metadata.json").write_text(json.dumps(meta))
    register(storage, name, version, to, meta["metrics"], meta)
    return version


def test_the_latest_version_registered_in_the_table_is_served(served, tmp_path):
    """Versions exist by their model_versions rows, not by the directories: on a copy of the store with
    every row deleted, nothing is served (503); then two versions, registered from directories outside the
    registry's, in an order their names do not sort in: the one registered last answers."""
    import shutil

    import duckdb
    from ray import serve

    from analytics.registry import latest

    url, root, storage, settings, first = served
    shutil.copy(root / "s.duckdb", tmp_path / "copy.duckdb")
    con = duckdb.connect(str(tmp_path / "copy.duckdb"))
    con.execute("DELETE FROM model_versions")
    con.close()
    copy = StorageConfig.embedded(tmp_path / "copy.duckdb")
    serve.run(own_app(copy.as_dict(), settings["registry"], user_config={"model_path": None}),
              name="podpulse-registry", route_prefix="/registry")
    try:
        base = f"{url}/registry"
        none = requests.post(f"{base}/v1/battery/score", json={"rows": [ROW]}, headers=AUTH)
        assert none.status_code == 503 and "no battery-anomaly model in the registry" in none.json()["detail"], none.text
        none = requests.get(f"{base}/v1/forecast/usage", params={"region": "NSW-urban"}, headers=AUTH)
        assert none.status_code == 503 and "no usage-forecast model in the registry" in none.json()["detail"], none.text

        registered_copy(first["path"], tmp_path / "elsewhere" / "zz-older", "zz-older", copy, "battery-anomaly")
        registered_copy(first["path"], tmp_path / "elsewhere" / "aa-newer", "aa-newer", copy, "battery-anomaly")
        answer = requests.post(f"{base}/v1/battery/score", json={"rows": [ROW]}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == "aa-newer"

        forecast = latest(storage, "usage-forecast")  # the one the fixture trained, in the original store

        def hours(start):
            def edit(meta):
                for r in meta["next_week"]["regions"]:
                    r["hours"] = [float(start + i) for i in range(7)]
            return edit

        for version, start in (("fc-zz-older", 100), ("fc-aa-newer", 200)):  # the forecast is looked up per request
            registered_copy(forecast["path"], tmp_path / "elsewhere" / version, version, copy, "usage-forecast",
                            hours(start))
            week = requests.get(f"{base}/v1/forecast/usage", params={"region": "NSW-urban"}, headers=AUTH)
            assert week.status_code == 200, week.text
            assert week.json()["model_version"] == version
            assert [d["listening_hours"] for d in week.json()["days"]] == [float(start + i) for i in range(7)]
    finally:
        serve.delete("podpulse-registry")


def test_a_bad_user_config_value_is_refused_with_a_clear_message(served):
    """By build(), before anything is deployed; by the replica's reconfigure() when it comes another way
    (a serve config file): at start-up Serve fails the deployment with the message naming the key; on a
    running replica (an in-place update) nothing of it is applied and the replica stays healthy."""
    from ray import serve

    from deployments.app import build

    url, root, _, settings, first = served
    for bad, message in [(dict(score_batch_size=0), "score_batch_size must be a whole number from 1 to 256"),
                         (dict(score_batch_size=2.5), "score_batch_size must be a whole number"),
                         (dict(score_batch_wait_s=-1), "score_batch_wait_s must be seconds from 0 to 1"),
                         (dict(score_batch_wait_s=5), "score_batch_wait_s must be seconds from 0 to 1"),
                         (dict(canary_percent=101), "canary_percent must be within 0..100")]:
        with pytest.raises(ValueError, match="refused user_config: " + message):
            build(**settings, **bad)
    refused = {"model_path": first["path"], "score_batch_wait_s": "fast", "batch_sise": 3}
    with pytest.raises(RuntimeError, match="Deploying application podpulse-refused failed"):
        serve.run(own_app(settings["storage"], settings["registry"], user_config=refused),
                  name="podpulse-refused", route_prefix="/refused")
    try:
        status = serve.status().applications["podpulse-refused"].deployments["PodPulseAPI"]
        assert status.status == "DEPLOY_FAILED"
        assert "refused user_config: unknown key(s) 'batch_sise'" in status.message, status.message
        assert "score_batch_wait_s must be seconds from 0 to 1 (how long a batch waits for more requests; " \
               "default 0), got 'fast'" in status.message, status.message

        serve.run(own_app(settings["storage"], settings["registry"], user_config={"model_path": first["path"]}),
                  name="podpulse-refused", route_prefix="/refused")
        handle = serve.get_app_handle("podpulse-refused")
        # What Serve calls on the running replica for an in-place update (a changed user_config of a serve config)
        with pytest.raises(Exception, match="refused user_config: score_batch_size must be a whole number from 1 "
                                            "to 256 .*got 0"):
            handle.reconfigure.remote({"model_path": None, "score_batch_size": 0}).result()
        assert handle.check_health.remote().result() is None
        answer = requests.post(f"{url}/refused/v1/battery/score", json={"rows": [ROW]}, headers=AUTH)
        assert answer.status_code == 200 and answer.json()["version"] == first["version"]  # model_path unchanged
    finally:
        serve.delete("podpulse-refused")


def lone_request_seconds(url: str, n: int = 3) -> float:
    """The fastest of ``n`` scoring requests sent one at a time."""
    took = []
    for _ in range(n):
        started = time.perf_counter()
        requests.post(f"{url}/v1/battery/score", json={"rows": [ROW]}, headers=AUTH).raise_for_status()
        took.append(time.perf_counter() - started)
    return min(took)


def test_the_scoring_batches_follow_user_config_live(served):
    """A lone request waits score_batch_wait_s for company, unless score_batch_size (1) is reached at once.
    Set at start-up from the deployment's user_config, then changed on the running replica: every serve.run
    from Python deploys a new code version (new replicas), so reconfigure() is called as Serve calls it for
    an in-place update (serve deploy, a RayService)."""
    from ray import serve

    url, _, _, settings, first = served
    serve.run(own_app(settings["storage"], settings["registry"],
                      user_config={"model_path": first["path"], "score_batch_wait_s": 0.5}),
              name="podpulse-batching", route_prefix="/batching")
    try:
        base, handle = f"{url}/batching", serve.get_app_handle("podpulse-batching")
        running = replicas("podpulse-batching")
        lone_request_seconds(base, 1)  # the first call traces the model's graph
        assert lone_request_seconds(base) >= 0.5

        def reconfigure(**user_config):
            handle.reconfigure.remote({"model_path": first["path"], **user_config}).result()

        reconfigure(score_batch_wait_s=0.5, score_batch_size=1)
        assert lone_request_seconds(base) < 0.3
        reconfigure(score_batch_wait_s=0.5)  # back to the default size: waits again
        assert lone_request_seconds(base) >= 0.5
        reconfigure()  # both defaults: 64 requests, 1 ms
        assert lone_request_seconds(base) < 0.3
        assert replicas("podpulse-batching") == running  # one replica throughout
    finally:
        serve.delete("podpulse-batching")


def test_check_health_fails_only_when_the_replica_cannot_serve_its_user_config(served, tmp_path):
    """A store (and so the registry) that cannot be read leaves the replica healthy, answering 503 where it
    needs the store; a model user_config names that fails to load makes it unhealthy, and Serve replaces it."""
    from ray import serve

    url, _, _, settings, _ = served
    unreadable = StorageConfig.embedded(tmp_path / "none.duckdb").as_dict()
    serve.run(own_app(unreadable, settings["registry"], user_config={"model_path": None}, health_check_period_s=1,
                      health_check_timeout_s=5), name="podpulse-health", route_prefix="/health")
    try:
        base, handle = f"{url}/health", serve.get_app_handle("podpulse-health")
        running = replicas("podpulse-health")
        assert len(running) == 1
        score = requests.post(f"{base}/v1/battery/score", json={"rows": [ROW]}, headers=AUTH)
        assert score.status_code == 503 and int(score.headers["Retry-After"]) > 0
        assert "the model registry (model_versions) cannot be read" in score.json()["detail"], score.text
        assert handle.check_health.remote().result() is None
        time.sleep(4)  # four health checks by Serve
        assert replicas("podpulse-health") == running
        assert requests.get(f"{base}/healthz").json() == {"status": "ok"}
        assert serve.status().applications["podpulse-health"].deployments["PodPulseAPI"].status == "HEALTHY"

        # What Serve does on an in-place update, called directly so that the replica is not stopped for the
        # failed reconfigure itself: only its health check can get it replaced.
        missing = str(tmp_path / "battery-anomaly" / "gone")
        with pytest.raises(Exception, match="user_config model_path .*gone' could not be loaded"):
            handle.reconfigure.remote({"model_path": missing}).result()
        with pytest.raises(Exception, match="this replica cannot serve its user_config"):
            handle.check_health.remote().result()
        score = requests.post(f"{base}/v1/battery/score", json={"rows": [ROW]}, headers=AUTH)
        assert score.status_code == 503 and "could not be loaded" in score.json()["detail"], score.text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (replicas("podpulse-health") & running or not replicas("podpulse-health")):
            time.sleep(0.5)
        assert replicas("podpulse-health") and not replicas("podpulse-health") & running  # replaced
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and serve.status().applications["podpulse-health"].status != "RUNNING":
            time.sleep(0.5)
        assert handle.check_health.remote().result() is None  # the new replica has the deployment's user_config
        assert requests.get(f"{base}/healthz").json() == {"status": "ok"}
    finally:
        serve.delete("podpulse-health")


# ---- hardening: the guard before the body, bounded input, the privacy floor, no 5xx for any input ----

def raw_status(url: str, head: str, body: bytes = b"", timeout: float = 5.0) -> int:
    """Send a request's head (and part of a body) on a socket and return the status the server
    answers with, without sending the rest: a server that waits for the whole body times out."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        return int(s.recv(4096).split(b" ", 2)[1])


def test_the_token_and_the_body_size_are_checked_before_the_body_is_read(served):
    """3 MB announced, 10 bytes sent: the answer comes from the headers alone (on main, FastAPI waited
    for the body before its 401). Over max_body_bytes (4 MiB by default) announced: 413 at once."""
    url, *_ = served
    head = "POST /v1/battery/score HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: {n}\n{auth}"
    assert raw_status(url, head.format(n=3_000_000, auth=""), b'{"rows": [') == 401
    assert raw_status(url, head.format(n=3_000_000, auth="Authorization: Bearer nope\n"), b'{"rows": [') == 401
    assert raw_status(url, head.format(n=5_000_000, auth=f"Authorization: Bearer {TOKEN}\n"), b'{"rows": [') == 413
    wrong = requests.get(f"{url}/v1/analytics/usage_trend", headers={"Authorization": "Bearer t\u00e9st".encode()})
    assert wrong.status_code == 401  # bytes that are not ASCII: refused, not a 500 from the comparison
    assert requests.get(f"{url}/healthz").status_code == 200


def test_the_docs_are_off_unless_configured(served):
    url, *_ = served
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert requests.get(f"{url}{path}").status_code == 404, path
        assert requests.get(f"{url}{path}", headers=AUTH).status_code == 404, path


def test_dates_outside_the_window_are_a_422_naming_the_parameter(served):
    url, *_ = served
    for query in ("usage_trend", "state_overview", "exposure", "firmware_adoption"):
        for params, name in (({"to": "9999-12-31"}, "to"), ({"from": "0001-01-01"}, "from")):
            answer = requests.get(f"{url}/v1/analytics/{query}", params=params, headers=AUTH)
            assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", name], answer.text
    edge = requests.get(f"{url}/v1/analytics/usage_trend", params={"from": "2000-01-01", "to": "2100-12-31"},
                        headers=AUTH)
    assert edge.status_code == 200 and edge.json()["rows"], edge.text


def test_k_may_raise_the_privacy_floor_never_lower_it(served):
    url, *_ = served
    for k in (1, 9):
        low = requests.get(f"{url}/v1/analytics/usage_trend", params={"k": k}, headers=AUTH)
        assert low.status_code == 422 and low.json()["detail"][0]["loc"] == ["query", "k"], low.text
        assert "min_k" in low.json()["detail"][0]["msg"]
    assert requests.get(f"{url}/v1/analytics/usage_trend", headers=AUTH).json()["k"] == 10
    assert requests.get(f"{url}/v1/analytics/usage_trend", params={"k": 30}, headers=AUTH).json()["k"] == 30


def test_hostile_values_get_a_4xx_or_a_reason_never_a_5xx(served):
    url, *_ = served
    nan = ('{"rows": [' + json.dumps(ROW)[:-1] + ', "anc": NaN}]}').encode()  # a bare NaN, as Python's json writes it
    answer = requests.post(f"{url}/v1/battery/score", data=nan, headers=AUTH | {"Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "rows", 0, "anc"], answer.text
    lone = requests.post(f"{url}/v1/battery/score", json={"rows": [dict(ROW, model="\ud800")]}, headers=AUTH)
    assert lone.status_code == 422 and lone.json()["detail"][0]["loc"] == ["body", "rows", 0, "model"], lone.text
    newline = requests.get(f"{url}/v1/devices/abcdef%0A/battery-health", headers=AUTH)
    assert newline.status_code == 422 and newline.json()["detail"][0]["loc"] == ["path", "device_id"]
    region = requests.get(f"{url}/v1/forecast/usage", params={"region": "NSW-urban\n"}, headers=AUTH)
    assert region.status_code == 422 and region.json()["detail"][0]["loc"] == ["query", "region"]

    events = [event(seq=10**30), event(model="\ud800"), event(**{f"x{i}": i for i in range(65)}), event()]
    answer = requests.post(f"{url}/v1/telemetry", json={"events": events}, headers=AUTH)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["accepted"] == 1 and [r["index"] for r in body["reasons"]] == [0, 1, 2], body
    assert "seq" in body["reasons"][0]["reason"] and "UTF-8" in body["reasons"][1]["reason"]
    assert "65 unknown fields, over 64" in body["reasons"][2]["reason"]


def test_the_guards_follow_user_config(served):
    """max_body_bytes, docs and min_k of the deployment's user_config, on an application of its own."""
    from ray import serve

    url, _, _, settings, first = served
    serve.run(own_app(settings["storage"], settings["registry"], user_config={
        "model_path": first["path"], "max_body_bytes": 2048, "docs": True, "min_k": 20}),
        name="podpulse-guards", route_prefix="/guards")
    try:
        base = f"{url}/guards"
        assert requests.post(f"{base}/v1/battery/score", json={"rows": [ROW] * 5}, headers=AUTH).status_code == 200
        announced = requests.post(f"{base}/v1/battery/score", json={"rows": [ROW] * 20}, headers=AUTH)
        assert announced.status_code == 413 and "max_body_bytes" in announced.json()["detail"], announced.text
        chunks = (json.dumps({"rows": [ROW] * 20}).encode()[i:i + 500] for i in range(0, 5000, 500))
        streamed = requests.post(f"{base}/v1/battery/score", data=chunks,  # chunked: no Content-Length
                                 headers=AUTH | {"Content-Type": "application/json"})
        assert streamed.status_code == 413, streamed.text
        for path in ("/docs", "/openapi.json"):  # published, without the token
            assert requests.get(f"{base}{path}").status_code == 200, path
        assert requests.get(f"{base}/v1/analytics/usage_trend", headers=AUTH).json()["k"] == 20
        assert requests.get(f"{base}/v1/analytics/usage_trend", params={"k": 15}, headers=AUTH).status_code == 422
        assert requests.get(f"{base}/v1/analytics/usage_trend", params={"k": 25}, headers=AUTH).json()["k"] == 25
    finally:
        serve.delete("podpulse-guards")


hostile_text = st.text(max_size=12) | st.sampled_from(
    ["\ud800", "NaN", "Infinity", "-1", "1e400", "9" * 40, "9999-12-31", "0001-01-01", "2024-02-30", "abcdef\n",
     "x' OR '1'='1", "\x00", "..", "%", "NSW-urban\n", "usage_trend"])
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3), max_leaves=8)


def changed(record: dict, draw) -> dict:
    """``record`` with a field replaced by a hostile value, a field dropped, or an unknown one added."""
    key = draw(st.sampled_from(sorted(record)) | hostile_text)
    if draw(st.booleans()):
        return {k: v for k, v in record.items() if k != key}
    return {**record, key: draw(json_value)}


@st.composite
def hostile_requests(draw) -> tuple[str, str, dict]:
    """(method, path, requests keyword arguments) for one endpoint, with hostile parts."""
    from urllib.parse import quote, urlencode

    endpoint = draw(st.sampled_from(["telemetry", "score", "analytics", "device", "forecast", "cohorts"]))
    if endpoint == "cohorts":  # a cohort to save: hostile names, fields and values
        fields = st.sampled_from(["model", "firmware", "state", "urban", "schema_version", "first_seen_from"])
        body = {"name": draw(hostile_text | st.sampled_from(["rural", "Pro 2 (NSW)"])),
                "cohort": draw(st.dictionaries(fields | hostile_text, json_value, max_size=3))}
        return "POST", "/v1/cohorts", {"data": json.dumps(body if draw(st.integers(0, 3)) else draw(json_value))}
    if endpoint in ("telemetry", "score"):
        key, path, good = {"telemetry": ("events", "/v1/telemetry", event),
                           "score": ("rows", "/v1/battery/score", lambda: dict(ROW))}[endpoint]
        items = [changed(good(), draw) if draw(st.booleans()) else draw(json_value)
                 for _ in range(draw(st.integers(0, 3)))]
        body = {key: items} if draw(st.integers(0, 3)) else draw(json_value)
        return "POST", path, {"data": json.dumps(body)}  # NaN, Infinity and lone surrogates as Python writes them
    params = draw(st.dictionaries(st.sampled_from(["from", "to", "k", "days", "region", "model", "state", "urban",
                                                   "schema_version", "first_seen_from", "cohort"]),
                                  hostile_text | st.integers(-10**20, 10**20).map(str) | st.dates().map(str),
                                  max_size=3))
    name = draw(st.sampled_from(["usage_trend", "state_overview", "exposure", "ap-0011223344556677"]) | hostile_text)
    name = quote(name, safe="", errors="surrogatepass")  # a lone surrogate's bytes too
    path = {"analytics": f"/v1/analytics/{name}", "device": f"/v1/devices/{name}/battery-health",
            "forecast": "/v1/forecast/usage"}[endpoint]
    return "GET", f"{path}?{urlencode(params, errors='surrogatepass')}", {}


@settings(max_examples=150, deadline=None)
@given(hostile_requests())
def test_no_request_gets_a_5xx(served, request_parts):
    """Generated hostile bodies and parameters to every endpoint, through Serve: always an answer below 500."""
    url, *_ = served
    method, path, kwargs = request_parts
    answer = requests.request(method, f"{url}{path}", headers=AUTH | {"Content-Type": "application/json"},
                              timeout=30, **kwargs)
    assert answer.status_code < 500, (method, path, kwargs, answer.status_code, answer.text[:500])


def test_the_guard_settings_are_checked_like_the_rest_of_user_config():
    """No Ray: parse_user_config on the guard keys."""
    from deployments.settings import MAX_BODY_BYTES, parse_user_config

    assert parse_user_config(None).max_body_bytes == MAX_BODY_BYTES and parse_user_config({}).min_k == 10
    assert parse_user_config({}).docs is False
    config = parse_user_config({"max_body_bytes": 2048, "docs": True, "min_k": 20.0})
    assert (config.max_body_bytes, config.docs, config.min_k) == (2048, True, 20)
    for bad, message in [({"min_k": 1}, "min_k must be a whole number from 2 to 1000"),
                         ({"min_k": True}, "min_k must be a whole number"),
                         ({"max_body_bytes": 10}, "max_body_bytes must be a whole number from 1024"),
                         ({"max_body_bytes": math.inf}, "max_body_bytes must be a whole number"),
                         ({"docs": "yes"}, "docs must be true or false"),
                         ({"drift_interval_s": 0.5}, "drift_interval_s must be 0 .never. or seconds from 1"),
                         ({"drift_interval_s": "hourly"}, "drift_interval_s must be"),
                         ({"drift_interval_s": math.nan}, "drift_interval_s must be")]:
        with pytest.raises(ValueError, match="refused user_config: " + message):
            parse_user_config(bad)
    assert parse_user_config({}).drift_interval_s == 3600 and parse_user_config({"drift_interval_s": 0}).drift_interval_s == 0


def test_a_422_repeats_only_short_json_safe_input():
    """No Ray: the 422 handler's detail can always be sent, and never floods the client."""
    from deployments.errors import refused_detail

    detail = refused_detail([{"type": "t", "loc": ("body", "\ud800", 0), "msg": "m", "input": math.nan,
                              "ctx": {"error": ValueError("x")}},
                             {"type": "t", "loc": ("query", "k"), "msg": "m", "input": "x" * 1000},
                             {"type": "t", "loc": ("query", "k"), "msg": "m", "input": 5}])
    json.dumps(detail, allow_nan=False, ensure_ascii=False).encode()  # sendable
    assert detail[0]["loc"] == ["body", "\\ud800", 0] and "input" not in detail[0]
    assert "input" not in detail[1] and detail[2]["input"] == 5


def bearer(token) -> dict:
    return {"Authorization": f"Bearer {token[0]}"}


def test_each_token_reaches_only_its_scopes_and_device_ids_need_read_devices(served):
    url, *_ = served
    telemetry = {"events": [event("ap-scope-1", seq=1)]}
    assert requests.post(f"{url}/v1/telemetry", json=telemetry, headers=bearer(INGEST)).status_code == 202
    for path in ("/v1/analytics/state_overview", "/v1/devices/ap-1/battery-health"):
        refused = requests.get(f"{url}{path}", headers=bearer(INGEST))
        assert refused.status_code == 403 and "read:" in refused.json()["detail"], refused.text
    assert requests.post(f"{url}/v1/telemetry", json=telemetry, headers=bearer(AGGREGATES)).status_code == 403
    assert requests.get(f"{url}/v1/devices/ap-1/battery-health", headers=bearer(AGGREGATES)).status_code == 403
    aggregates = requests.get(f"{url}/v1/analytics/battery_health", headers=bearer(AGGREGATES))
    assert aggregates.status_code == 403 and "admin" in aggregates.json()["detail"]  # exact only: no private release
    admin = requests.get(f"{url}/v1/analytics/battery_health", headers=AUTH).json()
    assert admin["extra"]["outliers"] and "privacy" not in admin


def test_a_token_is_rotated_by_rewriting_the_tokens_file_without_a_restart(served):
    url, root, *_ = served
    path, new = root / "tokens.yaml", new_token("product-team-2", ["read:aggregates"])
    before = path.read_text()
    try:
        path.write_text(yaml.safe_dump([INGEST[1], new[1]]))  # product-team's token revoked, its successor added
        deadline, codes = time.monotonic() + 20, (None, None)
        while time.monotonic() < deadline and codes != (401, 200):
            codes = tuple(requests.get(f"{url}/v1/analytics/state_overview", headers=bearer(t)).status_code
                          for t in (AGGREGATES, new))
            time.sleep(0.3)
        assert codes == (401, 200)
        path.write_text("- name: broken\n")  # a file that no longer reads revokes its tokens (fail closed)
        deadline, code = time.monotonic() + 20, None
        while time.monotonic() < deadline and code != 401:
            code = requests.get(f"{url}/v1/analytics/state_overview", headers=bearer(new)).status_code
            time.sleep(0.3)
        assert code == 401
        assert requests.get(f"{url}/v1/analytics/state_overview", headers=AUTH).status_code == 200  # the admin's
    finally:
        path.write_text(before)
        deadline = time.monotonic() + 20  # the tests after this one use product-team's token again
        while requests.get(f"{url}/v1/analytics/state_overview", headers=bearer(AGGREGATES)).status_code == 401 \
                and time.monotonic() < deadline:
            time.sleep(0.3)


def test_a_device_timeline_is_its_rollups_hour_by_hour_for_read_devices_only(served):
    import duckdb

    url, root, _, _, trained = served
    con = duckdb.connect(str(root / "s.duckdb"), read_only=True)
    try:  # a device the trained model flagged on some day
        (device,) = con.execute("SELECT min(device_id) FROM anomalies WHERE model_version = ?",
                                [trained["version"]]).fetchone()
    finally:
        con.close()
    answer = requests.get(f"{url}/v1/devices/{device}/timeline", headers=AUTH)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert (date.fromisoformat(got["to"]) - date.fromisoformat(got["from"])).days == 29  # its last 30 days
    con = duckdb.connect(str(root / "s.duckdb"), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        start = f"TIMESTAMP '{got['from']} 00:00:00+00' - INTERVAL 10 HOUR"
        hours, listening, low = con.execute(
            f"SELECT count(*), sum(listening_s), min(battery_left_min) FROM device_hourly "
            f"WHERE device_id = ? AND hour >= {start}", [device]).fetchone()
        flagged = con.execute("SELECT count(*) FROM anomalies WHERE device_id = ? AND model_version = ?",
                              [device, trained["version"]]).fetchone()[0]
        firmware = con.execute("SELECT DISTINCT firmware FROM device_firmware_daily WHERE device_id = ?",
                               [device]).fetchall()
    finally:
        con.close()
    assert len(got["hours"]) == hours > 24 and math.isclose(sum(h["listening_s"] for h in got["hours"]), listening)
    assert min(h["battery_left_min"] for h in got["hours"]) == low
    assert all(got["hours"][i]["hour"] < got["hours"][i + 1]["hour"] for i in range(len(got["hours"]) - 1))
    assert len([a for a in got["anomalies"] if a["model_version"] == trained["version"]]) == flagged > 0
    assert {f["firmware"] for f in got["firmware"]} == {fw for (fw,) in firmware}
    # a chosen window, and what is refused
    week = requests.get(f"{url}/v1/devices/{device}/timeline", headers=AUTH,
                        params={"from": got["from"], "to": str(date.fromisoformat(got["from"]) + timedelta(days=6))})
    assert week.status_code == 200 and 0 < len(week.json()["hours"]) < len(got["hours"])
    assert requests.get(f"{url}/v1/devices/{device}/timeline", headers=bearer(AGGREGATES)).status_code == 403
    assert requests.get(f"{url}/v1/devices/{'0' * 32}/timeline", headers=AUTH).status_code == 404
    too_long = requests.get(f"{url}/v1/devices/{device}/timeline", headers=AUTH,
                            params={"from": "2026-01-01", "to": "2026-06-30"})
    backwards = requests.get(f"{url}/v1/devices/{device}/timeline", headers=AUTH,
                             params={"from": "2026-06-30", "to": "2026-06-01"})
    assert too_long.status_code == 422 and "92 days" in too_long.json()["detail"]
    assert backwards.status_code == 422 and "before" in backwards.json()["detail"]


def test_only_an_admin_token_erases_a_device(served):
    """Last in this module: it takes a device out of the store the other tests read."""
    url, _, storage, *_ = served
    device = run_queries(storage, {"d": "SELECT device_id FROM devices ORDER BY device_id LIMIT 1"})["d"][0][0]
    for token in (INGEST, AGGREGATES):
        refused = requests.delete(f"{url}/v1/devices/{device}", headers=bearer(token))
        assert refused.status_code == 403 and "'admin'" in refused.json()["detail"], refused.text
    assert requests.delete(f"{url}/v1/devices/not%20an%20id", headers=AUTH).status_code == 422
    answer = requests.delete(f"{url}/v1/devices/{device}", headers=AUTH)
    assert answer.status_code == 200, answer.text
    backend = answer.json()["backends"]["embedded"]
    assert backend["tables"]["devices"] == 1 and backend["tables"]["events"] > 0 and backend["tombstones"] == 1
    assert requests.get(f"{url}/v1/devices/{device}/battery-health", headers=AUTH).status_code == 404


def test_a_reader_gets_private_answers_the_same_all_day_and_429_past_its_budget(served):
    url, root, *_ = served
    budget = requests.get(f"{url}/v1/privacy/budget", headers=bearer(ANALYST)).json()
    assert budget["spent"] == 0 and budget["daily_epsilon"] == 10 and budget["epsilon_per_answer"] == 1
    first = requests.get(f"{url}/v1/analytics/usage_trend", headers=bearer(ANALYST)).json()
    assert "suppressed_cells" not in first and first["privacy"]["spent_now"] == 1
    assert len(first["intervals"]) == len(first["rows"]) and first["privacy"]["epsilon"] == 1
    exact = requests.get(f"{url}/v1/analytics/usage_trend", headers=AUTH).json()
    assert first["rows"] != exact["rows"] and "privacy" not in exact
    again = requests.get(f"{url}/v1/analytics/usage_trend", headers=bearer(ANALYST)).json()
    assert again["rows"] == first["rows"] and again["privacy"]["spent_now"] == 0  # averaging gains nothing
    assert requests.get(f"{url}/v1/privacy/budget", headers=bearer(ANALYST)).json()["spent"] == 1
    # nine more questions (each range a day shorter) spend the rest; the eleventh is refused
    for i in range(1, 11):
        end = date.fromisoformat(first["range"]["to"]) - timedelta(days=i)
        answer = requests.get(f"{url}/v1/analytics/state_overview", params={"to": end.isoformat()},
                              headers=bearer(ANALYST))
        if i < 10:
            assert answer.status_code == 200, answer.text
    assert answer.status_code == 429 and "refreshes at" in answer.json()["detail"], answer.text
    assert 0 < int(answer.headers["Retry-After"]) <= 86_401
    budget = requests.get(f"{url}/v1/privacy/budget", headers=bearer(ANALYST)).json()
    assert budget["spent"] == 10 and budget["left"] == 0
    # an answer released already is still given, at no cost
    assert requests.get(f"{url}/v1/analytics/usage_trend", headers=bearer(ANALYST)).json()["rows"] == first["rows"]


def test_every_exact_read_is_recorded_with_who_and_what(served):
    import duckdb

    url, root, *_ = served
    assert requests.get(f"{url}/v1/analytics/mode_shares", headers=AUTH).status_code == 200
    con = duckdb.connect(str(root / "s.duckdb.privacy.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT who, what FROM exact_reads WHERE what LIKE 'mode_shares %'").fetchall()
    finally:
        con.close()
    assert rows and rows[-1][0] == "PODPULSE_API_TOKEN" and "k=10" in rows[-1][1]


def test_a_refused_request_closes_its_connection_instead_of_reading_the_body(served):
    """401 to a declared 512 MiB body: the answer, then the server hangs up, having read none of it."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(served[0])
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 536870912\r\n\r\n" + b"[" * 65536)
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                pytest.fail(f"the connection stayed open, waiting for the rest of the body: {received[:200]!r}")
            if not chunk:
                break  # closed by the server
            received += chunk
    assert received.startswith(b"HTTP/1.1 401") and b"connection: close" in received.lower(), received[:300]


def test_a_write_succeeds_while_reads_are_in_flight_and_no_error_names_a_path(served):
    url, root, *_ = served
    stop, codes = threading.Event(), []

    def read():
        while not stop.is_set():
            codes.append(requests.get(f"{url}/v1/analytics/state_overview", headers=AUTH, timeout=60).status_code)

    readers = [threading.Thread(target=read) for _ in range(16)]
    for t in readers:
        t.start()
    try:
        time.sleep(1)
        saved = [requests.post(f"{url}/v1/cohorts", json={"name": f"busy-{i}-{uuid.uuid4().hex[:6]}",
                                                          "cohort": {"model": "AirPods Pro 2"}},
                               headers=AUTH, timeout=60) for i in range(3)]
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert [s.status_code for s in saved] == [201] * 3, [s.text for s in saved]
    assert codes and set(codes) <= {200, 503}
    assert str(root) not in "".join(s.text for s in saved)
