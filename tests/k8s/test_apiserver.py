"""PodPulse's CRDs on a real kube-apiserver (``kube``: etcd and kube-apiserver 1.37, no nodes).

The other tests here check the schemas with jsonschema and mirror the CEL rules in Python;
these ask the API server itself: the CRDs are structural and Established, every example is
stored with exactly the defaults the operator assumes, and a bad resource is refused with the
CRD's own message.
"""

import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from crds import reconcile as rc

KINDS = ["AirPodsDataStream", "OracleDBSchemaManager", "AIModelDeployer"]
SPEC_OF = {"AirPodsDataStream": rc.stream_spec, "OracleDBSchemaManager": rc.schema_spec,
           "AIModelDeployer": rc.deployer_spec}


def plural(crd: dict) -> str:
    return crd["spec"]["names"]["plural"]


def create(kube_api, crd: dict, doc: dict, dry_run: bool = False) -> dict:
    """Create ``doc`` in namespace podpulse as ``kubectl create`` would (unknown fields are errors,
    not pruned); the stored object."""
    doc = {k: v for k, v in doc.items() if k in ("apiVersion", "kind", "metadata", "spec")}
    doc["metadata"] = {"name": doc["metadata"]["name"]}
    return client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        rc.GROUP, rc.VERSION, "podpulse", plural(crd), doc, field_validation="Strict",
        **({"dry_run": "All"} if dry_run else {}))


def refusal(kube_api, crd: dict, doc: dict) -> dict:
    """The API server's answer to ``doc``, which it must refuse: as invalid (422, a cause per field),
    or as undecodable (400: an unknown field under strict field validation)."""
    with pytest.raises(ApiException) as refused:
        create(kube_api, crd, doc, dry_run=True)
    assert refused.value.status in (400, 422), refused.value.body
    return json.loads(refused.value.body)


def test_the_api_server_is_kubernetes_1_37_and_we_are_its_admin(kube_api):
    assert client.VersionApi(kube_api).get_code().git_version.startswith("v1.37.")
    review = client.AuthenticationV1Api(kube_api).create_self_subject_review({})
    assert "system:masters" in review.status.user_info.groups


@pytest.mark.parametrize("kind", KINDS)
def test_every_example_is_stored_with_the_defaults_the_operator_assumes(kube_api, podpulse_crds, example, kind):
    doc = example(kind)
    stored = create(kube_api, podpulse_crds[kind], doc)
    assert stored["metadata"]["namespace"] == "podpulse" and stored["metadata"]["generation"] == 1
    # The server fills the schema's defaults; reconcile's *_spec fills the same ones itself.
    assert stored["spec"] == SPEC_OF[kind](doc)
    client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(  # the name is free for the next tests
        rc.GROUP, rc.VERSION, "podpulse", plural(podpulse_crds[kind]), doc["metadata"]["name"])


def test_a_bad_resource_is_refused_with_the_crds_message(kube_api, podpulse_crds, example):
    doc = example("AirPodsDataStream", consumers=13)  # 12 partitions
    answer = refusal(kube_api, podpulse_crds["AirPodsDataStream"], doc)
    assert answer["reason"] == "Invalid"
    assert [c["field"] for c in answer["details"]["causes"]] == ["spec"]
    assert "consumers must not exceed partitions" in answer["message"]


DELETE = object()


def changed(doc: dict, changes: dict) -> dict:
    """``doc`` with each ``"a.b.c": value`` set (``DELETE`` removes the field); keys may contain dots
    when written as a tuple path."""
    for path, value in changes.items():
        parts = path if isinstance(path, tuple) else tuple(path.split("."))
        node = doc
        for part in parts[:-1]:
            node = node[part]
        if value is DELETE:
            del node[parts[-1]]
        else:
            node[parts[-1]] = value
    return doc


PG = {"type": "postgresql", "url": "postgresql://podpulse@db/podpulse"}
ROUTES = dict.fromkeys(["raw_events", "devices", "rollups", "offsets", "anomalies"], "pg")
# kind, changes, the field the API server blames (a CEL rule on a map's value names it [key]),
# words of its message (the CRD's own for a CEL rule)
REFUSED = [
    # OpenAPI schema: types, ranges, patterns, enums, required fields
    ("AirPodsDataStream", {"spec.partitions": 0}, "spec.partitions", "greater than or equal to 1"),
    ("AirPodsDataStream", {"spec.partitions": "12"}, "spec.partitions", "must be of type integer"),
    ("AirPodsDataStream", {"spec.topic": "telemetry events"}, "spec.topic", "should match"),
    ("AirPodsDataStream", {"spec.bootstrap": "kafka"}, "spec.bootstrap", "should match"),
    ("AirPodsDataStream", {"spec.lingerMs": -5}, "spec.lingerMs", "greater than or equal to 0"),
    ("AirPodsDataStream", {"spec.storage": DELETE}, "spec.storage", "Required value"),
    ("AirPodsDataStream", {"spec.storage.routes.anomalies": DELETE}, "spec.storage.routes.anomalies",
     "Required value"),
    ("AirPodsDataStream", {"spec.storage.backends.core.type": "mysql"}, "spec.storage.backends.core.type",
     'Unsupported value: "mysql"'),
    ("AirPodsDataStream", {"spec.storage.backends.core.url": "oracle://podpulse:secret@db:1521/x"},
     "spec.storage.backends.core.url", "should match"),
    ("AirPodsDataStream", {"spec.storage.backends.raw.port": 70000}, "spec.storage.backends.raw.port",
     "less than or equal to 65535"),
    ("AirPodsDataStream", {"spec.credentialsSecret": "Bad_Secret"}, "spec.credentialsSecret", "should match"),
    ("AirPodsDataStream", {"spec.workers.memory": "4GB"}, "spec.workers.memory", "should match"),
    ("AirPodsDataStream", {"spec.rayVersion": "2.60"}, "spec.rayVersion", "should match"),
    ("AirPodsDataStream", {"spec.storage.retention.raw_events": 0}, "spec.storage.retention.raw_events",
     "greater than or equal to 1"),
    ("AirPodsDataStream", {"spec.storage.backends.core.password_env": "RAY_AUTH_TOKEN"},
     "spec.storage.backends.core.password_env", "should match '^PODPULSE_"),
    ("AirPodsDataStream", {"spec.storage.backends.raw.username_env": "HOME"},
     "spec.storage.backends.raw.username_env", "should match '^PODPULSE_"),
    # kubectl's strict field validation: a password in the storage config is an unknown field
    ("AirPodsDataStream", {"spec.storage.backends.core.password": "hunter2"}, "",
     'unknown field "spec.storage.backends.core.password"'),
    # CEL rules (x-kubernetes-validations)
    ("AirPodsDataStream", {"metadata.name": "1fleet"}, "<nil>", "name must be a DNS-1035 label of at most 38"),
    ("AirPodsDataStream", {"metadata.name": "s" * 39}, "<nil>", "name must be a DNS-1035 label of at most 38"),
    ("AirPodsDataStream", {"spec.consumers": 13}, "spec", "consumers must not exceed partitions"),
    ("AirPodsDataStream", {"spec.image": "podpulse:2.59.0-py311"}, "spec",
     "image podpulse:2.59.0-py311: its tag must start with rayVersion 2.60.0"),
    ("AirPodsDataStream", {"spec.kafka": {"sasl.password": "hunter2"}}, "spec",
     "credentials go in kafkaConfigSecret"),
    ("AirPodsDataStream", {"spec.kafka": {"enable.auto.commit": "true"}}, "spec.kafka",
     "a key is not an allowed Kafka setting"),
    ("AirPodsDataStream", {"spec.kafka": {"security.protocol": "PLAINTEXT; rm -rf"}}, "spec.kafka",
     "security.protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    ("AirPodsDataStream", {"spec.kafka": {"sasl.mechanism": "NONE"}}, "spec.kafka", "sasl.mechanism(s) must be"),
    ("AirPodsDataStream", {"spec.kafka": {"session.timeout.ms": "soon"}}, "spec.kafka",
     "timeouts, sizes and counts are whole numbers"),
    ("AirPodsDataStream", {"spec.kafka": {"ssl.ca.location": "/etc/passwd"}}, "spec",
     "ssl.*.location must name a file of the mounted kafkaConfigSecret"),
    ("AirPodsDataStream", {"spec.kafka": {"ssl.key.location": "/etc/podpulse/kafka/../../passwd"}}, "spec",
     "ssl.*.location must name a file of the mounted kafkaConfigSecret"),
    ("AirPodsDataStream", {"spec.kafka": {"ssl.ca.location": "/etc/podpulse/kafka/ca.crt"},
                           "spec.kafkaConfigSecret": DELETE}, "spec",
     "ssl.*.location must name a file of the mounted kafkaConfigSecret"),
    # password_file: maxLength 0 answers first (CEL rules run only on an object the schema passed);
    # the rule is what refuses even an empty one
    ("AirPodsDataStream", {"spec.storage.backends.core.password_file":
                           "/var/run/secrets/kubernetes.io/serviceaccount/token"},
     "spec.storage.backends.core.password_file", "may not be more than 0 bytes"),
    ("AirPodsDataStream", {"spec.storage.backends.core.password_file": ""},
     "spec.storage.backends[core]", "password_file is refused: passwords come from credentialsSecret"),
    ("AirPodsDataStream", {"spec.storage.backends.core.url": DELETE}, "spec.storage.backends[core]",
     "postgresql and oracle backends need a url"),
    ("AirPodsDataStream", {"spec.storage.backends.raw.hosts": DELETE}, "spec.storage.backends[raw]",
     "cassandra backends need hosts"),
    ("AirPodsDataStream", {"spec.storage": {"backends": {"pg": PG, "duck": {"type": "duckdb"}},
                                            "routes": {**ROUTES, "rollups": "duck"}}}, "spec.storage",
     "devices, rollups and offsets must route to the same backend"),
    ("AirPodsDataStream", {"spec.storage": {"backends": {"pg": PG}, "routes": {**ROUTES, "anomalies": "nowhere"}}},
     "spec.storage", "every route must name a backend"),
    ("AirPodsDataStream", {"spec.storage.routes.anomalies": "raw"}, "spec.storage",
     "only raw_events may route to cassandra"),
    ("AirPodsDataStream", {"spec.storage.retention": {"devices": 30}}, "spec.storage.retention",
     "only raw_events, rollups and anomalies expire"),
    ("AirPodsDataStream", {"spec.storage.retention.raw_events": 7301}, "spec.storage",
     "Cassandra keeps a row at most 7300 days"),
    ("AirPodsDataStream", {"spec.workers.cpu": "0.5"}, "spec.workers.cpu", "should match"),
    ("AirPodsDataStream", {"spec.head": {"cpu": "0m"}}, "spec.head.cpu", "should match"),
    ("AirPodsDataStream", {"spec.workers.cpu": 65}, "spec.workers.cpu", "less than or equal to 64"),
    ("AirPodsDataStream", {"spec.kafka": {"security.protocol": "SASL_PLAINTEXT"}}, "spec",
     "how the credentials travel is its properties file's to say"),
    ("OracleDBSchemaManager", {"spec.targetVersion": 0}, "spec.targetVersion", "greater than or equal to 1"),
    ("OracleDBSchemaManager", {"spec.targetVersion": 1.5}, "spec.targetVersion", "must be of type integer"),
    ("OracleDBSchemaManager", {"spec.connectionSecret": DELETE}, "spec.connectionSecret", "Required value"),
    ("OracleDBSchemaManager", {"spec.connectionSecret.name": "Podpulse_Oracle"}, "spec.connectionSecret.name",
     "should match"),
    ("OracleDBSchemaManager", {"spec.backoffLimit": 11}, "spec.backoffLimit", "less than or equal to 10"),
    ("OracleDBSchemaManager", {"metadata.name": "m" * 47}, "<nil>", "name must be a DNS-1035 label of at most 46"),
    ("AIModelDeployer", {"spec.canaryPercent": 150}, "spec.canaryPercent", "less than or equal to 100"),
    ("AIModelDeployer", {"spec.canaryPercent": -1}, "spec.canaryPercent", "greater than or equal to 0"),
    ("AIModelDeployer", {"spec.model": "usage-forecast"}, "spec.model", 'Unsupported value: "usage-forecast"'),
    ("AIModelDeployer", {"spec.version": "../../etc"}, "spec.version", "should match"),
    ("AIModelDeployer", {"spec.rayService.name": "PodPulse"}, "spec.rayService.name", "should match"),
    ("AIModelDeployer", {"spec.registry": "models"}, "spec.registry", "should match"),
]


@pytest.mark.parametrize("kind, changes, field, words", REFUSED,
                         ids=[f"{k}:{','.join(map(str, c))[:60]}" for k, c, _, _ in REFUSED])
def test_each_bad_resource_is_refused_with_the_expected_message(kube_api, podpulse_crds, example, kind, changes,
                                                                  field, words):
    answer = refusal(kube_api, podpulse_crds[kind], changed(example(kind), changes))
    causes = [(c.get("field", ""), c["message"]) for c in answer.get("details", {}).get("causes", [])]
    causes = causes or [("", answer["message"])]
    assert any(f == field and words in m for f, m in causes), causes


# What the rules above must not refuse: variants of the examples the operator accepts too.
ACCEPTED = [
    ("AirPodsDataStream", {"metadata.name": "s" * 38}),
    ("AirPodsDataStream", {"spec.image": "podpulse@sha256:" + "0" * 64}),  # a digest: nothing to compare
    ("AirPodsDataStream", {"spec.image": "registry.local:5000/team/podpulse:2.60.0-py311"}),
    ("AirPodsDataStream", {"spec.image": "podpulse"}),  # untagged: the registry's latest
    ("AirPodsDataStream", {"spec.kafkaConfigSecret": DELETE,  # no Secret: the resource says how to connect
                           "spec.kafka": {"security.protocol": "sasl_ssl", "sasl.mechanism": "SCRAM-SHA-512",
                                          "client.id": "podpulse-au"}}),
    ("AirPodsDataStream", {"spec.kafka": {"session.timeout.ms": "45000", "fetch.max.bytes": "52428800",
                                          "compression.codec": "zstd"}}),
    ("AirPodsDataStream", {"spec.kafka": {"ssl.ca.location": "/etc/podpulse/kafka/ca.crt",
                                          "ssl.certificate.location": "/etc/podpulse/kafka/tls.crt",
                                          "ssl.key.location": "/etc/podpulse/kafka/tls.key"}}),
    ("AirPodsDataStream", {"spec.storage.retention.raw_events": 7300}),
    ("AirPodsDataStream", {"spec.storage": {"backends": {"pg": PG}, "routes": ROUTES,
                                            "retention": {"raw_events": 9000}}}),  # no TTL cap off Cassandra
    ("AirPodsDataStream", {"spec.head": {"cpu": "250m", "memory": "1Gi"}, "spec.workers.cpu": "500m"}),
    ("AirPodsDataStream", {"spec.workers.cpu": "4"}),
    ("OracleDBSchemaManager", {"metadata.name": "m" * 46}),
    ("AIModelDeployer", {"spec.canaryPercent": 0}),
]


@pytest.mark.parametrize("kind, changes", ACCEPTED, ids=[f"{k}:{','.join(map(str, c))[:60]}" for k, c in ACCEPTED])
def test_variants_the_operator_accepts_pass_the_crd(kube_api, podpulse_crds, example, kind, changes):
    stored = create(kube_api, podpulse_crds[kind], changed(example(kind), changes), dry_run=True)
    assert stored["metadata"]["uid"]
