"""The one-node cluster of the end-to-end tests (``testbed.cluster``), started once per module.

Run by ``make e2e`` (``pytest -m e2e tests/e2e``), never by ``make test``. As root: the node
configures this machine's network, and takes it all down again after.
"""

from __future__ import annotations

import pytest

from testbed.cluster import OneNodeCluster


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster, its node Ready and its DNS serving; removed after the module."""
    with OneNodeCluster() as c:
        yield c


@pytest.fixture(scope="module")
def core(cluster):
    from kubernetes import client  # heavy: only the end-to-end tests talk to the cluster

    return client.CoreV1Api(cluster.api_client())
