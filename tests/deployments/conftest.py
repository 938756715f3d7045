"""The Serve application of tests/deployments, started once for the package: a demo-like store
(250 devices × 29 days), the three models trained, the admin token and a scoped tokens file."""

import pytest
import yaml

# Serve reads its settings when it is first imported: here, before the session's Ray puts SERVE_ENV in
# this process's environment (tests/conftest.py ray_local), so the handles these synchronous tests
# call keep Serve's default and route in a loop of their own. Imported after, a handle would need the
# caller's event loop (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 is for the replicas and the proxy).
from deployments.app import build
from jobs.segments import train_segments
from jobs.train import train_battery_anomaly, train_usage_forecast
from podpulse.broker import free_port
from storage.config import StorageConfig
from testbed.api import AGGREGATES, ANALYST, INGEST, token_env
from testbed.stores import build_store


@pytest.fixture(scope="package")
def served(ray_local, broker, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    build_store(root / "s.duckdb", 250, 29, seed=71)
    storage = StorageConfig.embedded(root / "s.duckdb")
    first = train_battery_anomaly(storage, registry=root / "models", epochs=1)
    train_usage_forecast(storage, registry=root / "models", epochs=5)
    train_segments(storage, registry=root / "models", epochs=3, k_min=5)
    broker.create_topic("serve-telemetry", 2)
    port = free_port()
    (root / "tokens.yaml").write_text(yaml.safe_dump([INGEST[1], AGGREGATES[1], ANALYST[1]]))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = dict(storage=storage.as_dict(), bootstrap=broker.bootstrap, topic="serve-telemetry",
                    registry=str(root / "models"),
                    env={**token_env(root), "PODPULSE_API_TOKENS_FILE": str(root / "tokens.yaml")})
    serve.run(build(**settings), name="podpulse", route_prefix="/")
    yield f"http://127.0.0.1:{port}", root, storage, settings, first
    serve.shutdown()


