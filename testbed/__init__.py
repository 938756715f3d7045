"""What the tests and the benchmarks both run against, so that neither imports the other.

- servers, started and stopped for real: ``process`` (the shared lifecycle), ``kafka``,
  ``cassandra``, ``postgres``, ``kube`` (etcd, kube-apiserver, kube-controller-manager),
  ``kuberay`` (KubeRay's operator), and ``servers`` (each started once, on first use);
- ``stores``: a store of a simulated fleet, written straight through the commit path;
- ``topics``: simulated messages, produced with every acknowledgement awaited, and read back;
- ``watch``: a thread polling the offsets stored with the data (how much is stored, and when all was);
- ``api``: the tokens of a Serve application started for a test or a benchmark.

Only the benchmarks import this package; the floors below them never do. The servers' jars come from ``make infra``
(``testbed/maven``), the control plane's binaries from ``make kube``.
"""
