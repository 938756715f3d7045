"""The polyglot storage layer: one interface per role, one module per backend, the router."""
