"""The PodPulse CRDs: valid CRDs, examples that pass their schemas, invalid resources that do not."""

import copy

import jsonschema
import pytest
import ray
import yaml

from crds import reconcile as rc
from storage.base import StorageError
from storage.config import StorageConfig
from storage.migrations import LATEST

KINDS = ["AirPodsDataStream", "OracleDBSchemaManager", "AIModelDeployer"]


def load_crd(root, name):
    return yaml.safe_load((root / "crds" / name).read_text())


CRD_FILES = {"AirPodsDataStream": "podpulse.io_airpodsdatastreams.yaml",
             "OracleDBSchemaManager": "podpulse.io_oracledbschemamanagers.yaml",
             "AIModelDeployer": "podpulse.io_aimodeldeployers.yaml"}


@pytest.mark.parametrize("kind", KINDS)
def test_crd_is_a_valid_v1_crd_with_status_and_printer_columns(root, k8s_validate, kind):
    doc = load_crd(root, CRD_FILES[kind])
    k8s_validate(doc)
    spec = doc["spec"]
    assert doc["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    assert spec["group"] == rc.GROUP and spec["names"]["kind"] == kind and spec["scope"] == "Namespaced"
    (version,) = spec["versions"]
    assert version["name"] == rc.VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    assert "spec" in schema["required"] and schema["properties"]["spec"]["required"]
    # Every printer column points at a field the schema declares (or standard metadata).
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"].lstrip(".").split(".")
        if path[0] == "metadata":
            continue
        node = schema
        for part in path:
            node = node["properties"][part]
        assert node["type"] == column["type"], column
    names = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Age"} <= names


@pytest.mark.parametrize("kind", KINDS)
def test_example_validates_against_its_crd(example, validate_cr, kind):
    validate_cr(example(kind))


def _set(doc, path, value):
    node = doc
    for part in path[:-1]:
        node = node[part]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


DELETE = object()
INVALID = [
    ("AirPodsDataStream", ["spec", "pseudonymKeySecret"], DELETE),  # a stream without a stable key scrambles ids
    ("AirPodsDataStream", ["spec", "pseudonymKeySecret"], "Not_A_Name"),
    ("AirPodsDataStream", ["spec", "partitions"], -1),
    ("AirPodsDataStream", ["spec", "partitions"], 0),
    ("AirPodsDataStream", ["spec", "partitions"], "12"),
    ("AirPodsDataStream", ["spec", "consumers"], 0),
    ("AirPodsDataStream", ["spec", "topic"], "telemetry events"),
    ("AirPodsDataStream", ["spec", "bootstrap"], "kafka"),
    ("AirPodsDataStream", ["spec", "batchSize"], 0),
    ("AirPodsDataStream", ["spec", "lingerMs"], -5),
    ("AirPodsDataStream", ["spec", "storage", "routes", "anomalies"], DELETE),
    ("AirPodsDataStream", ["spec", "storage", "backends", "core", "type"], "mysql"),
    ("AirPodsDataStream", ["spec", "storage", "backends", "core", "url"], "oracle://podpulse:secret@db:1521/x"),
    ("AirPodsDataStream", ["spec", "storage", "backends", "raw", "port"], 70000),
    ("AirPodsDataStream", ["spec", "storage", "backends", "raw", "consistency"], "MOSTLY"),
    ("AirPodsDataStream", ["spec", "credentialsSecret"], "Bad_Secret"),
    ("AirPodsDataStream", ["spec", "workers", "memory"], "4GB"),
    ("AirPodsDataStream", ["spec", "workers", "cpu"], "1.5"),
    ("AirPodsDataStream", ["spec", "head"], {"cpu": 0}),
    ("AirPodsDataStream", ["spec", "rayVersion"], "2.60"),
    ("AirPodsDataStream", ["spec", "storage"], DELETE),
    ("AirPodsDataStream", ["spec", "storage", "retention", "raw_events"], 0),
    ("AirPodsDataStream", ["spec", "storage", "retention", "rollups"], "30"),
    ("AirPodsDataStream", ["spec", "storage", "retention"], {"raw_events": 1, "rollups": 1, "anomalies": 1,
                                                             "devices": 1}),
    # What the operator's policy refuses, as far as a schema can say it (tests/k8s/test_policy.py):
    ("AirPodsDataStream", ["spec", "storage", "backends", "core", "password_file"],
     "/var/run/secrets/kubernetes.io/serviceaccount/token"),
    ("AirPodsDataStream", ["spec", "storage", "backends", "core", "password_env"], "RAY_AUTH_TOKEN"),
    ("AirPodsDataStream", ["spec", "storage", "backends", "raw", "username_env"], "HOME"),
    ("OracleDBSchemaManager", ["spec", "targetVersion"], 0),
    ("OracleDBSchemaManager", ["spec", "targetVersion"], 1.5),
    ("OracleDBSchemaManager", ["spec", "connectionSecret"], DELETE),
    ("OracleDBSchemaManager", ["spec", "connectionSecret", "name"], "Podpulse_Oracle"),
    ("OracleDBSchemaManager", ["spec", "backoffLimit"], 11),
    ("AIModelDeployer", ["spec", "canaryPercent"], 150),
    ("AIModelDeployer", ["spec", "canaryPercent"], -1),
    ("AIModelDeployer", ["spec", "model"], "usage-forecast"),
    ("AIModelDeployer", ["spec", "version"], "../../etc"),
    ("AIModelDeployer", ["spec", "rayService", "name"], "PodPulse"),
    ("AIModelDeployer", ["spec", "registry"], "models"),
]


@pytest.mark.parametrize("kind, path, value", INVALID,
                         ids=[f"{k}:{'.'.join(p[1:])}={'missing' if v is DELETE else v}" for k, p, v in INVALID])
def test_invalid_resources_are_rejected(example, validate_cr, kind, path, value):
    doc = example(kind)
    _set(doc, path, value)
    with pytest.raises(jsonschema.ValidationError):
        validate_cr(doc)


def _schema_defaults(obj, schema):
    """What the API server does with `default`: fill absent fields, recursing into objects present."""
    obj = copy.deepcopy(obj)
    for key, sub in schema.get("properties", {}).items():
        if key not in obj and "default" in sub:
            obj[key] = copy.deepcopy(sub["default"])
        if isinstance(obj.get(key), dict) and sub.get("type") == "object":
            obj[key] = _schema_defaults(obj[key], sub)
    return obj


@pytest.mark.parametrize("kind, spec_of", [("AirPodsDataStream", rc.stream_spec),
                                           ("OracleDBSchemaManager", rc.schema_spec),
                                           ("AIModelDeployer", rc.deployer_spec)])
def test_reconcile_defaults_are_the_crd_defaults(example, crd_schema, kind, spec_of):
    spec_schema = crd_schema(kind)["properties"]["spec"]
    minimal = example(kind)
    # Keep only required fields, so every default is exercised.
    minimal["spec"] = {k: v for k, v in minimal["spec"].items() if k in spec_schema["required"]}
    for doc in (minimal, example(kind)):
        assert spec_of(doc) == _schema_defaults(doc["spec"], spec_schema)


def test_the_crd_ingest_defaults_are_podpulse_ingest_defaults(crd_schema):
    """One set of ingest defaults: IngestConfig's (podpulse ingest's options read them too)."""
    from actors.config import INGEST_DEFAULTS

    props = crd_schema("AirPodsDataStream")["properties"]["spec"]["properties"]
    crd = {name: props[key]["default"] for key, name in (("batchSize", "batch_size"), ("lingerMs", "linger_ms"),
                                                        ("maxInFlight", "max_in_flight"), ("dlqTopic", "dlq_topic"))}
    assert crd == {name: INGEST_DEFAULTS[name] for name in crd}


def test_ray_version_is_the_pinned_ray(crd_schema):
    assert rc.RAY_VERSION == ray.__version__
    spec = crd_schema("AirPodsDataStream")["properties"]["spec"]
    assert spec["properties"]["rayVersion"]["default"] == ray.__version__
    assert rc.DEFAULT_IMAGE.split(":")[1].startswith(ray.__version__)


def test_example_storage_and_migration_target_are_accepted_by_podpulse(example):
    StorageConfig(**example("AirPodsDataStream")["spec"]["storage"])
    assert 1 <= example("OracleDBSchemaManager")["spec"]["targetVersion"] <= LATEST


PG = {"type": "postgresql", "url": "postgresql://podpulse@db/podpulse"}
STORAGE_CASES = [
    {"backends": {"pg": PG}, "routes": dict.fromkeys(["raw_events", "devices", "rollups", "offsets", "anomalies"],
                                                     "pg")},
    {"backends": {"pg": PG, "cass": {"type": "cassandra", "hosts": ["c1"]}},
     "routes": {"raw_events": "cass", "devices": "pg", "rollups": "pg", "offsets": "pg", "anomalies": "pg"}},
    # raw events may not be the only thing in cassandra:
    {"backends": {"pg": PG, "cass": {"type": "cassandra", "hosts": ["c1"]}},
     "routes": {"raw_events": "pg", "devices": "pg", "rollups": "pg", "offsets": "pg", "anomalies": "cass"}},
    # one transaction, one backend:
    {"backends": {"pg": PG, "duck": {"type": "duckdb", "path": "/data/x.duckdb"}},
     "routes": {"raw_events": "pg", "devices": "pg", "rollups": "duck", "offsets": "pg", "anomalies": "pg"}},
    # a route to nowhere:
    {"backends": {"pg": PG}, "routes": {"raw_events": "pg", "devices": "pg", "rollups": "pg", "offsets": "pg",
                                        "anomalies": "nowhere"}},
    # retention: the registry and offsets never expire; days are whole and positive:
    {"backends": {"pg": PG}, "routes": dict.fromkeys(["raw_events", "devices", "rollups", "offsets", "anomalies"],
                                                     "pg"), "retention": {"raw_events": 30, "rollups": 400}},
    {"backends": {"pg": PG}, "routes": dict.fromkeys(["raw_events", "devices", "rollups", "offsets", "anomalies"],
                                                     "pg"), "retention": {"devices": 30}},
    {"backends": {"pg": PG}, "routes": dict.fromkeys(["raw_events", "devices", "rollups", "offsets", "anomalies"],
                                                     "pg"), "retention": {"raw_events": 0}},
    # a missing route:
    {"backends": {"pg": PG}, "routes": {"raw_events": "pg", "devices": "pg", "rollups": "pg", "offsets": "pg"}},
]


@pytest.mark.parametrize("storage", STORAGE_CASES)
def test_reconcile_storage_rules_agree_with_the_router(storage):
    """The operator refuses exactly the storage routing podpulse ingest would refuse."""
    try:
        StorageConfig(**copy.deepcopy(storage))
        router_ok = True
    except StorageError:
        router_ok = False
    try:
        rc.check_storage(storage)
        reconcile_ok = True
    except rc.InvalidSpec:
        reconcile_ok = False
    assert reconcile_ok == router_ok
