"""Ray actors of the ingest pipeline: supervisor, partition consumers, storage writer."""
