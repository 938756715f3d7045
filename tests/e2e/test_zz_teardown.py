"""A cluster leaves nothing behind on the host: no process, mount, link or iptables chain of its own.
(Last in the folder: the module before it has taken its cluster down by then.)"""

from __future__ import annotations

from testbed.cluster import OneNodeCluster, leftovers


def test_a_cluster_taken_down_leaves_nothing_on_the_host():
    assert leftovers() == [], "the previous module's cluster left these"
    with OneNodeCluster() as c:
        assert c.timings["node Ready"] >= 0
        assert leftovers()  # while it runs, there is something to find: the check can fail
    assert leftovers() == []
