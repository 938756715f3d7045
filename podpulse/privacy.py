"""The privacy floor every published figure keeps, and the differentially private release of counts
and sums that a token without ``admin`` reads (OpenDP's mechanisms: no noise is sampled here).

The unit of privacy is a device. A release bounds what one device can add (at most ``cells`` cells,
each value clamped), then adds Laplace noise scaled to that bound over ε. Whether a cell is shown is
decided on its noisy device count (never the exact one), so the set of cells shown is private too:
over a fixed set of keys (days, states, hours) that is post-processing and spends nothing more; over
keys that come from the data (firmware versions) OpenDP's thresholded Laplace sets the bar for δ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

__all__ = ["MIN_K", "QUERY_EPSILON", "DAILY_EPSILON", "DELTA", "CONFIDENCE", "Noise", "laplace", "thresholded",
           "half_width"]

# No published cell (report, API, metric) describes fewer devices than this; a caller may raise it,
# never lower it. Under differential privacy it is a floor on the noisy device count.
MIN_K = 10
QUERY_EPSILON = 1.0  # what one answer spends, split over its measures
DAILY_EPSILON = 10.0  # a token's budget per UTC day (Apple reports about 16 a day over all its uses)
DELTA = 1e-7  # the chance the guarantee of a release whose keys come from the data fails
CONFIDENCE = 0.95  # of the intervals given beside each noisy value


@dataclass(frozen=True)
class Noise:
    """What one measure of a release spent and how noisy it is."""

    measure: str
    epsilon: float
    delta: float
    scale: float  # of the Laplace noise: its standard deviation is scale * sqrt(2)
    sensitivity: float  # how much one device can move the measure (L1, over all its cells)

    def as_dict(self) -> dict:
        return {"measure": self.measure, "epsilon": self.epsilon, "delta": self.delta, "scale": self.scale,
                "sensitivity": self.sensitivity, "half_width_95": half_width(self.scale)}


@cache
def _dp():
    """OpenDP's domains, metrics and measurements, loaded on first use: every module reads MIN_K from
    here, and ``opendp.prelude`` would also import its scikit-learn extras (2.4 s)."""
    from opendp import domains, measurements, metrics, mod  # heavy: a Rust library, 0.25 s

    mod.enable_features("contrib")
    return domains, metrics, measurements


def _counts_space():
    domains, metrics, _ = _dp()
    return (domains.map_domain(domains.atom_domain(T=str), domains.atom_domain(T=float, nan=False)),
            metrics.l01inf_distance(metrics.absolute_distance(T=float)))


def half_width(scale: float, confidence: float = CONFIDENCE) -> float:
    """Half the width of the interval holding a value's Laplace noise with ``confidence``."""
    return scale * math.log(1 / (1 - confidence))


def laplace(measure: str, values: list[float], sensitivity: float, epsilon: float) -> tuple[list[float], Noise]:
    """``values`` with Laplace noise for ``epsilon``-DP, when one device moves them by at most
    ``sensitivity`` in total (L1)."""
    scale = sensitivity / epsilon
    domains, metrics, measurements = _dp()
    space = domains.vector_domain(domains.atom_domain(T=float, nan=False)), metrics.l1_distance(T=float)
    mechanism = measurements.make_laplace(*space, scale=scale)
    spent = mechanism.map(float(sensitivity))
    noisy = mechanism([float(v) for v in values]) if values else []
    return noisy, Noise(measure, spent, 0.0, scale, sensitivity)


@lru_cache(maxsize=64)
def _threshold(cells: int, scale: float, floor: int, delta: float) -> tuple[float, float, float]:
    """The lowest threshold of at least ``floor`` whose release keeps to ``delta`` when a device is in
    up to ``cells`` cells with 1 each; with the ε and δ OpenDP's privacy map gives it."""
    def measured(threshold: float) -> tuple[float, float]:
        return _dp()[2].make_laplace_threshold(*_counts_space(), scale=scale, threshold=threshold).map(
            (cells, float(cells), 1.0))

    low, high = float(floor), float(floor)
    while measured(high)[1] > delta:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) / 2
        low, high = (mid, high) if measured(mid)[1] > delta else (low, mid)
    epsilon, spent_delta = measured(high)
    return high, epsilon, spent_delta


def thresholded(measure: str, counts: dict[str, float], cells: int, epsilon: float, floor: int,
                delta: float = DELTA) -> tuple[dict[str, float], Noise, float]:
    """Noisy device counts of keys that come from the data, only those over the threshold: the
    lowest at or above ``floor`` for which the keys shown keep to ``delta`` when a device counts once
    in each of up to ``cells`` keys. Returns the counts kept, the noise, and the threshold."""
    scale = cells / epsilon
    threshold, spent, spent_delta = _threshold(cells, scale, floor, delta)
    mechanism = _dp()[2].make_laplace_threshold(*_counts_space(), scale=scale, threshold=threshold)
    kept = mechanism({k: float(v) for k, v in counts.items()}) if counts else {}
    return kept, Noise(measure, spent, spent_delta, scale, float(cells)), threshold
