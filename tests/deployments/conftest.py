"""The Serve application of tests/deployments, started once for the package: a demo-like store
(250 devices × 29 days), the three models trained, the admin token and a scoped tokens file."""

import pytest
import yaml

from bench.report import build_store
from infra.served import AGGREGATES, INGEST, TOKEN
from podpulse.broker import free_port
from podpulse.segments import train_segments
from podpulse.train import train_battery_anomaly, train_usage_forecast
from storage.router import StorageConfig


@pytest.fixture(scope="package")
def served(ray_local, broker, tmp_path_factory):
    from ray import serve

    from deployments.app import build

    root = tmp_path_factory.mktemp("serve")
    build_store(root / "s.duckdb", 250, 29, seed=71)
    storage = StorageConfig.embedded(root / "s.duckdb")
    first = train_battery_anomaly(storage, registry=root / "models", epochs=1)
    train_usage_forecast(storage, registry=root / "models", epochs=5)
    train_segments(storage, registry=root / "models", epochs=3, k_min=5)
    broker.create_topic("serve-telemetry", 2)
    port = free_port()
    (root / "tokens.yaml").write_text(yaml.safe_dump([INGEST[1], AGGREGATES[1]]))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = dict(storage=storage.as_dict(), bootstrap=broker.bootstrap, topic="serve-telemetry",
                    registry=str(root / "models"),
                    env={"PODPULSE_API_TOKEN": TOKEN, "PODPULSE_API_TOKENS_FILE": str(root / "tokens.yaml")})
    serve.run(build(**settings), name="podpulse", route_prefix="/")
    yield f"http://127.0.0.1:{port}", root, storage, settings, first
    serve.shutdown()


