"""Ray Serve applications (FastAPI ingress) and their configuration."""
