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
    """Create ``doc`` in namespace podpulse, as ``kubectl create`` would; the stored object."""
    doc = {k: v for k, v in doc.items() if k in ("apiVersion", "kind", "metadata", "spec")}
    doc["metadata"] = {"name": doc["metadata"]["name"]}
    return client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        rc.GROUP, rc.VERSION, "podpulse", plural(crd), doc, **({"dry_run": "All"} if dry_run else {}))


def refusal(kube_api, crd: dict, doc: dict) -> dict:
    """The API server's answer to ``doc``, which it must refuse as invalid (422 Unprocessable)."""
    with pytest.raises(ApiException) as refused:
        create(kube_api, crd, doc, dry_run=True)
    assert refused.value.status == 422, refused.value.body
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


def test_a_bad_resource_is_refused_with_the_crds_message(kube_api, podpulse_crds, example):
    doc = example("AirPodsDataStream", consumers=13)  # 12 partitions
    answer = refusal(kube_api, podpulse_crds["AirPodsDataStream"], doc)
    assert answer["reason"] == "Invalid"
    assert [c["field"] for c in answer["details"]["causes"]] == ["spec"]
    assert "consumers must not exceed partitions" in answer["message"]
