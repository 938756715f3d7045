"""A concurrent writer, inside the operator process of tests/k8s/test_operator_live.py.

That test starts ``kopf run <this file> -m crds.operator``. Just before the operator's first
merge patch of the RayService named by ``PODPULSE_TEST_INTERFERE``, this writes to the same
RayService once (an annotation, with the operator's own client and token), as KubeRay or a
``kubectl`` user might at that moment. The resourceVersion the operator's patch carries is then
stale and the API server answers 409 Conflict: the answer, the handler's reaction and the retry
are the API server's and the operator's own. Only the timing is arranged, so the test is not
left to a race. The Deployment loads nothing of this.
"""

from __future__ import annotations

import os
import threading

from crds import operator as op

TARGET = os.environ.get("PODPULSE_TEST_INTERFERE", "")
ANNOTATION = "podpulse.io/test-interfered"

_merge_patch = op.Cluster.merge_patch
_done: set[tuple[str, str]] = set()
_lock = threading.Lock()  # kopf runs sync handlers in threads


def merge_patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict) -> None:
    with _lock:
        first = kind == "RayService" and name == TARGET and (namespace, name) not in _done
        if first:
            _done.add((namespace, name))
    if first:  # unconditional (no resourceVersion): it always lands, and moves the resourceVersion on
        _merge_patch(self, api_version, kind, namespace, name, {"metadata": {"annotations": {ANNOTATION: "1"}}})
    _merge_patch(self, api_version, kind, namespace, name, patch)


op.Cluster.merge_patch = merge_patch
