"""Jobs: what ``podpulse`` and ``ray job submit`` run. Each joins Ray where it needs it (ingest,
training with Ray Data) and calls the floors below: the ingest actors, analytics and models, storage."""
