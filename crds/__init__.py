"""PodPulse CustomResourceDefinitions and their operator.

``crds.reconcile`` holds the logic as pure functions; ``crds.operator`` is the kopf
entry point (``kopf run --standalone -m crds.operator``). Importing this package
imports neither: kopf is loaded only by the operator.
"""
