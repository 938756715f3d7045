"""The benchmarks of issue 15 run small and their figures add up (the figures themselves are in the README)."""

from bench import commit, decode, peak, privacy, report


def test_decode_reads_the_same_samples_in_both_shapes_and_keeps_them_all():
    result = decode.run(events=5000)
    for shape in ("event", "upload"):
        r = result[shape]
        assert r["events"] >= 5000 and r["rows"] == r["events"]  # every simulated sample is valid
        assert r["events_per_s"] > 0 and r["raw_parse_events_per_s"] > 0
    assert result["upload"]["messages"] * 20 < result["event"]["messages"]  # 50-sample uploads


def test_commit_stores_every_batch_with_its_offsets():
    result = commit.run(events=6000, batch_size=2000)
    assert (result["events"], result["commits"]) == (6000, 3)
    assert result["events_per_s"] > 0 and result["raw_insert_events_per_s"] > 0


def test_the_peak_hour_is_ingested_live_and_the_lag_drains(ray_local):
    result = peak.run(devices=100_000, minutes=0.3, sample_devices=300)
    assert result["peak_factor"] > 1.5  # evenings and commutes: the busiest hour is well above the mean
    assert result["rate_produced_events_per_s"] >= 0.9 * result["rate_asked_events_per_s"]
    assert result["stored_events"] == result["events_produced"] > 0
    assert result["lag_at_end_messages"] == 0 and result["dead_lettered"] == 0


def test_report_reads_every_stored_event_on_both_stores(tmp_path, pg_url):
    config = tmp_path / "pg.yaml"
    config.write_text(f"backends: {{pg: {{type: postgresql, url: '{pg_url}'}}}}\n")
    for storage_file in (None, str(config)):
        result = report.run(devices=200, days=2, repeat=1, storage_file=storage_file)
        assert result["events_scanned"] == result["events_stored"] > 5000, storage_file
        assert result["seconds"] > 0 and result["raw_scan_seconds"] >= 0 and result["timeline_ms_p50"] > 0
    assert result["store"] == str(config)


def test_privacy_measures_each_private_query_and_the_attack_beside_exact_answers():
    result = privacy.run(devices=400, days=5, runs=2)
    assert set(result["queries"]) == {"usage_trend", "state_overview", "mode_shares", "firmware_adoption"}
    for q in result["queries"].values():
        assert q["epsilon"] == 1.0 and q["error_median"] > 0 and q["baseline_error"] == 0
    overview = result["queries"]["state_overview"]
    assert 0 <= overview["listening_within_2pct"] <= 1 and overview["interval_95_held"] >= 0.5
    attack = result["attack"]
    assert attack["baseline_error_h"] == 0 and attack["error_h_median"] > 1  # noisy, where exact was off by 0
