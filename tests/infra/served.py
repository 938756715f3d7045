"""What the tests of tests/deployments share with the package's ``served`` fixture (conftest.py):
its tokens. (A module of its own: a conftest cannot be imported by name under importlib mode.)"""

from deployments.tokens import new_token

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Scoped tokens, from the tokens file the served fixture gives the replicas
INGEST, AGGREGATES = new_token("gateway", ["ingest"]), new_token("product-team", ["read:aggregates"])
