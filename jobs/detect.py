"""Firmware regression detection as a job: every firmware version against the one before it, the
findings kept in the store (``GET /v1/firmware/regressions``, the gauge and its alert read them)."""

from __future__ import annotations

from analytics.regressions import CONFIDENCE, MIN_EFFECT, detect, record
from podpulse.privacy import MIN_K
from storage.config import StorageConfig

__all__ = ["detect_and_record"]


def detect_and_record(config: StorageConfig, *, min_k: int = MIN_K, min_effect: float = MIN_EFFECT,
                      confidence: float = CONFIDENCE) -> dict:
    """Detect (:func:`analytics.regressions.detect`), record the findings, and return them with the
    options they were found with and how many are regressions."""
    findings = detect(config, min_k=min_k, min_effect=min_effect, confidence=confidence)
    detected_at = record(config, findings)
    return {"detected_at": detected_at.isoformat(), "min_k": min_k, "min_effect": min_effect,
            "confidence": confidence, "findings": [f.as_dict() for f in findings],
            "regressions": sum(f.regression for f in findings)}
