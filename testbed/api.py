"""What a Serve application started for tests and benchmarks signs in with, and one row it scores."""

from pathlib import Path

from deployments.tokens import new_token, write_token_file

__all__ = ["TOKEN", "AUTH", "INGEST", "AGGREGATES", "ANALYST", "ROW", "token_env"]

TOKEN = "test-admin-token-of-24-characters-or-more"  # the admin token (every scope)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Scoped tokens (token, tokens-file entry): a tokens file of these gives the replicas both
INGEST, AGGREGATES = new_token("gateway", ["ingest"]), new_token("product-team", ["read:aggregates"])
ANALYST = new_token("analyst", ["read:aggregates"])  # a second reader, with a privacy budget of its own
# One device-hour as POST /v1/battery/score takes it
ROW = {"model": "AirPods Pro 2", "firmware": "7A294", "playback_h": 0.8, "anc": 0.5, "adaptive": 0.1,
       "transparency": 0.1, "output_dba": 70.0, "drain_left_pct": 18.0, "drain_right_pct": 17.0}


def token_env(folder: Path) -> dict[str, str]:
    """The replicas' environment for :data:`TOKEN`: the file that holds it, written in ``folder``. Never
    the token itself: a ``runtime_env``'s variables are written to Ray's logs."""
    return {"PODPULSE_API_TOKEN_FILE": str(write_token_file(TOKEN, Path(folder) / "admin-token").resolve())}
