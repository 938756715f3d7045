"""Analytics and models: the fleet's questions asked of the store (``queries``), who they count
(``cohort``), the models (battery anomaly, usage forecast, firmware regressions) and their registry,
and the HTML report. Plain Python over the storage reader; no Ray, no ingest actors."""
