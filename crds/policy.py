"""What a custom resource may ask of the operator: images, Secrets, storage and Kafka settings.

Whoever may create an AirPodsDataStream or an OracleDBSchemaManager gets pods that run an
image and read Secrets of the namespace. The allowlists that bound this are the operator's
own configuration (its environment, read once at start by :meth:`Policy.from_env`), never
the resource's. A resource asking for more is :class:`Refused`: no children, and a status
condition naming the field and the value.

Pure, like ``crds.reconcile``: the operator looks up the labels of the Secrets a resource
names and passes them in.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

__all__ = ["InvalidSpec", "Refused", "Policy", "KAFKA_SETTINGS", "KAFKA_FILES", "check_images",
           "check_secrets", "check_storage_credentials", "check_kafka", "check_hosts", "refuse"]

# The Secrets the project's own docs and examples name: allowed unless the configuration says otherwise.
DEFAULT_SECRETS = frozenset({"podpulse-credentials", "podpulse-kafka", "podpulse-oracle", "podpulse-pseudonym-key"})
# The hosts a resource may send data and credentials to (its Kafka bootstrap servers, its storage
# backends): an entry starting with "." admits every name under it, any other entry one name, and
# "{namespace}" stands for the resource's own. By default the Services of its own namespace only: a
# host of the resource's own choosing, or another team's Service, would receive the telemetry and
# the credentials of the allowed Secrets (password_env).
DEFAULT_HOSTS = (".{namespace}.svc", ".{namespace}.svc.cluster.local")
# Query parameters a backend URL may carry. Any other is refused: libpq's host, hostaddr and service
# (and Oracle's dsn) would send the connection, and its password, to a host the check never saw.
URL_PARAMETERS = frozenset({"service_name", "sslmode", "connect_timeout", "application_name",
                            "target_session_attrs"})
# Kafka settings that decide how the credentials travel: from the kafkaConfigSecret alone when there is
# one (a resource's SASL_PLAINTEXT would send a SCRAM-over-TLS password in the clear).
KAFKA_SECURITY = frozenset({"security.protocol", "sasl.mechanism", "sasl.mechanisms",
                            "ssl.endpoint.identification.algorithm"})
# Admitting Secrets by label needs `get` on Secrets (RBAC cannot grant their metadata alone): off by default.
DEFAULT_SECRET_LABEL = ""
# password_env / username_env name variables of the credentials Secret (envFrom), never others of
# the pod (KubeRay's RAY_AUTH_TOKEN, say), which would go to a host of the resource's choosing.
CREDENTIAL_ENV = re.compile(r"PODPULSE_[A-Z0-9_]+")

_INT = r"[0-9]{1,10}"
_NAME = r"[A-Za-z0-9._-]{1,255}"
_MECHANISMS = r"PLAIN|SCRAM-SHA-256|SCRAM-SHA-512|GSSAPI|OAUTHBEARER"
# librdkafka settings a resource may set (-X key=value), each with the values it may take. Credentials
# (sasl.username, sasl.password, ...) come only from the kafkaConfigSecret's properties file. Never here:
# anything that loads code or runs a command (plugin.library.paths, sasl.kerberos.kinit.cmd,
# ssl.engine.location, sasl.oauthbearer.*), and nothing podpulse ingest sets itself (group.id, offsets).
KAFKA_SETTINGS = {
    "security.protocol": r"(?i:PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)",
    "sasl.mechanism": _MECHANISMS, "sasl.mechanisms": _MECHANISMS,
    "ssl.endpoint.identification.algorithm": r"none|https",
    "client.id": _NAME, "client.rack": _NAME,
    "compression.type": r"none|gzip|snappy|lz4|zstd", "compression.codec": r"none|gzip|snappy|lz4|zstd",
    **dict.fromkeys(["session.timeout.ms", "request.timeout.ms", "socket.timeout.ms", "message.timeout.ms",
                     "delivery.timeout.ms", "heartbeat.interval.ms", "max.poll.interval.ms", "metadata.max.age.ms",
                     "socket.connection.setup.timeout.ms", "reconnect.backoff.ms", "reconnect.backoff.max.ms",
                     "retry.backoff.ms", "retry.backoff.max.ms", "fetch.wait.max.ms", "linger.ms",
                     "queue.buffering.max.ms"], _INT),
    **dict.fromkeys(["fetch.min.bytes", "fetch.max.bytes", "max.partition.fetch.bytes", "fetch.message.max.bytes",
                     "receive.message.max.bytes", "message.max.bytes", "queued.min.messages",
                     "queued.max.messages.kbytes", "batch.size", "batch.num.messages",
                     "queue.buffering.max.messages", "queue.buffering.max.kbytes"], _INT),
}
# File settings: allowed only as files of the mounted kafkaConfigSecret.
KAFKA_FILES = frozenset({"ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.crl.location"})


class InvalidSpec(ValueError):
    """The resource cannot be reconciled as written; retrying will not help."""


class Refused(InvalidSpec):
    """The resource asks for what the operator's configuration does not allow."""


def _repository(image: str) -> str:
    """``registry/path/name`` of an image reference, without its tag or digest."""
    name = image.split("@", 1)[0]
    colon = name.rfind(":")
    return name[:colon] if colon > name.rfind("/") else name


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The operator's allowlists; ``from_env`` names the environment variables.

    ``images``: repositories (any tag or digest of them) or prefixes ending in ``/`` (every
    repository under them); empty means the repository of ``image``, the operator's own.
    ``secrets``: Secret names allowed as they are; ``secret_label``: ``key=value`` that admits
    any other Secret carrying it (empty: none).
    """

    image: str
    images: tuple[str, ...] = ()
    secrets: frozenset[str] = DEFAULT_SECRETS
    secret_label: str = DEFAULT_SECRET_LABEL
    hosts: tuple[str, ...] = DEFAULT_HOSTS

    @classmethod
    def from_env(cls, env: Mapping[str, str], image: str) -> Policy:
        """PODPULSE_ALLOWED_IMAGES, PODPULSE_ALLOWED_SECRETS and PODPULSE_ALLOWED_HOSTS (comma-separated),
        PODPULSE_ALLOWED_SECRET_LABEL.

        Unset, each keeps its default; empty, images fall back to ``image``'s repository, and no
        Secret is admitted by name (or by label), and no host."""
        secrets, hosts = env.get("PODPULSE_ALLOWED_SECRETS"), env.get("PODPULSE_ALLOWED_HOSTS")
        return cls(image=image, images=tuple(_csv(env.get("PODPULSE_ALLOWED_IMAGES", ""))),
                   secrets=DEFAULT_SECRETS if secrets is None else frozenset(_csv(secrets)),
                   secret_label=env.get("PODPULSE_ALLOWED_SECRET_LABEL", DEFAULT_SECRET_LABEL).strip(),
                   hosts=DEFAULT_HOSTS if hosts is None else tuple(h.lower() for h in _csv(hosts)))

    def allowed_hosts(self, namespace: str) -> list[str]:
        return [h.replace("{namespace}", namespace.lower()) for h in self.hosts]

    def allows_host(self, host: str, namespace: str) -> bool:
        """``namespace``: the resource's own, for the entries that name it."""
        host = host.lower().rstrip(".")
        return bool(host) and any(host == h or (h.startswith(".") and host.endswith(h))
                                  for h in self.allowed_hosts(namespace))

    def allows_image(self, image: str) -> bool:
        repo = _repository(image)
        return any(repo == p or (p.endswith("/") and repo.startswith(p))
                   for p in self.images or (_repository(self.image),))

    def unlisted(self, names: Iterable[str]) -> list[str]:
        """The names the list does not allow: the operator reads their labels, if a label may admit them."""
        return sorted(set(names) - self.secrets) if self.secret_label else []

    def allows_secret(self, name: str, labels: Mapping[str, str] | None) -> bool:
        """``labels``: the Secret's labels, None if it was not looked up or does not exist."""
        if name in self.secrets:
            return True
        key, _, value = self.secret_label.partition("=")
        return bool(key) and labels is not None and labels.get(key) == value


def check_images(policy: Policy, spec: dict) -> list[str]:
    """Problems with ``spec.image``; a resource without one gets the operator's own."""
    image = spec.get("image")
    if image is None or policy.allows_image(image):
        return []
    allowed = ", ".join(policy.images or (_repository(policy.image),))
    return [f"spec.image {image!r} is not an allowed image (allowed: {allowed}; PODPULSE_ALLOWED_IMAGES)"]


def _host(address: str) -> str:
    """``host`` of ``host:port``, ``[v6]:port`` or a URL's network location."""
    return urlsplit(address if "//" in address else f"//{address}").hostname or ""


def _url_hosts(field: str, url: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The hosts a backend URL reaches, every one of a multi-host authority (``a:5432,b:5432``), and
    the problems with its query parameters."""
    parts = urlsplit(url)
    authority = parts.netloc.rpartition("@")[2]
    hosts = [(f"{field}", _host(a.strip())) for a in authority.split(",")]
    problems = [f"{field} query parameter {key!r} is refused (allowed: {', '.join(sorted(URL_PARAMETERS))})"
                for key, _ in parse_qsl(parts.query, keep_blank_values=True) if key.lower() not in URL_PARAMETERS]
    return hosts, problems


def check_hosts(policy: Policy, spec: dict, namespace: str) -> list[str]:
    """Every host a stream reaches: its bootstrap servers, its backends' URLs and Cassandra hosts.
    ``namespace``: the resource's."""
    named = [("spec.bootstrap", _host(a.strip())) for a in str(spec.get("bootstrap", "")).split(",") if a.strip()]
    problems = []
    for name, backend in sorted(((spec.get("storage") or {}).get("backends") or {}).items()):
        if backend.get("url"):
            hosts, refused = _url_hosts(f"spec.storage.backends.{name}.url", str(backend["url"]))
            named += hosts
            problems += refused
        named += [(f"spec.storage.backends.{name}.hosts", _host(str(h))) for h in backend.get("hosts") or []]
    allowed = ", ".join(policy.allowed_hosts(namespace)) or "none"
    return problems + [f"{field} host {host!r} is not an allowed host (allowed: {allowed}; PODPULSE_ALLOWED_HOSTS)"
                       for field, host in named if not policy.allows_host(host, namespace)]


def check_secrets(policy: Policy, named: Mapping[str, str], labels: Mapping[str, dict | None]) -> list[str]:
    """``named``: field → Secret name; ``labels``: name → labels of the Secrets the operator looked up."""
    how = "list it in PODPULSE_ALLOWED_SECRETS" + (f" or label it {policy.secret_label}" if policy.secret_label else "")
    return [f"{field} {name!r} is not an allowed Secret ({how})"
            for field, name in named.items() if not policy.allows_secret(name, labels.get(name))]


def check_storage_credentials(storage: dict) -> list[str]:
    """Passwords come from the credentials Secret's variables, never from a file in the pod; the
    pseudonym key from pseudonymKeySecret, mounted by the operator."""
    problems = []
    if "pseudonym_key_file" in storage:
        problems.append(f"spec.storage.pseudonym_key_file {storage['pseudonym_key_file']!r} is refused: the key "
                        "comes from pseudonymKeySecret")
    for name, backend in sorted((storage.get("backends") or {}).items()):
        where = f"spec.storage.backends.{name}"
        if "password_file" in backend:
            problems.append(f"{where}.password_file {backend['password_file']!r} is refused: passwords come "
                            "from credentialsSecret (password_env)")
        for key in ("password_env", "username_env"):
            if key in backend and not CREDENTIAL_ENV.fullmatch(str(backend[key])):
                problems.append(f"{where}.{key} {backend[key]!r} is refused: name a PODPULSE_* key of "
                                "credentialsSecret")
    return problems


def _kafka_problem(key: str, value: str, files_dir: str | None) -> str | None:
    if key in KAFKA_FILES:
        inside = files_dir and posixpath.normpath(value) == value and value.startswith(files_dir.rstrip("/") + "/")
        return None if inside else f"spec.kafka {key!r}: {value!r} is not a file of the kafkaConfigSecret " \
                                   f"({files_dir or 'none is mounted'})"
    if key not in KAFKA_SETTINGS:
        return f"spec.kafka {key!r} is not an allowed Kafka setting"
    if not re.fullmatch(KAFKA_SETTINGS[key], str(value)):
        return f"spec.kafka {key!r}: value {value!r} is not allowed"
    return None


def check_kafka(settings: Mapping[str, str], files_dir: str | None) -> list[str]:
    """Every key must be allowlisted; ``files_dir``: where the kafkaConfigSecret is mounted, if it is.
    With that Secret, how the credentials travel is its to say (``-X`` would override its file)."""
    problems = [p for key, value in sorted(settings.items()) if (p := _kafka_problem(key, value, files_dir))]
    if files_dir:
        problems += [f"spec.kafka {key!r} is refused with a kafkaConfigSecret: its properties file sets it"
                     for key in sorted(KAFKA_SECURITY & set(settings))]
    return problems


def refuse(problems: list[str]) -> None:
    if problems:
        raise Refused("; ".join(problems))
