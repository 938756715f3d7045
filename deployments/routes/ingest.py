"""HTTP ingest: events and device uploads checked against the event contract, produced to Kafka."""

import msgspec
from fastapi import APIRouter, HTTPException

from deployments.errors import log, text
from deployments.guard import needs
from deployments.schemas import TelemetryRequest
from deployments.service import Api
from deployments.settings import DELIVERY_WAIT_S, RETRY_AFTER_S
from deployments.tokens import Scope
from podpulse.contract import decode_batch, upload_with
from podpulse.errors import BrokerError
from podpulse.kafka import deliver

router = APIRouter()


def encoded(events: list[dict]) -> tuple[list[bytes | None], dict[int, str]]:
    """Each event as JSON bytes for the contract's decoder; an event JSON cannot carry (a lone
    surrogate in a string) is None there, with its reason by index."""
    values, unwritable = [], {}
    for i, event in enumerate(events):
        try:
            values.append(msgspec.json.encode(event))
        except (TypeError, ValueError, OverflowError) as e:  # UnicodeEncodeError is a ValueError
            values.append(None)
            unwritable[i] = f"not writable as UTF-8 JSON ({type(e).__name__}: {text(e)[:200]}) - at `$`"
    return values, unwritable


def accepted_records(values: list[bytes | None], decoded) -> list[tuple[bytes, bytes, None]]:
    """(key, value, no headers) per message with an accepted event: an event as sent, an upload as sent
    or cut down to its accepted samples."""
    ids = decoded.table["device_id"].to_pylist()
    kept: dict[int, tuple[str, list[int]]] = {}
    for row, (i, k) in enumerate(zip(decoded.rows.tolist(), decoded.samples.tolist())):
        kept.setdefault(i, (ids[row], []))[1].append(k)
    cut = {r.index for r in decoded.rejected if r.sample is not None}
    return [(key.encode(), upload_with(values[i], samples) if i in cut else values[i], None)
            for i, (key, samples) in kept.items()]


# A plain def: FastAPI runs it in a thread, so waiting for Kafka's acknowledgements
# does not hold up the replica's event loop.
@router.post("/v1/telemetry", status_code=202, dependencies=[needs(Scope.ingest)])
def telemetry(api: Api, body: TelemetryRequest) -> dict:
    """Validate with the event contract, produce the valid events to Kafka; 202 once Kafka
    acknowledged every one of them, else 503 with ``Retry-After`` and Kafka's reason."""
    if api.producer is None:
        raise HTTPException(status_code=503, detail="HTTP ingest is not configured (no Kafka topic)")
    values, unwritable = encoded(body.events)
    decoded = decode_batch(values)
    records = accepted_records(values, decoded)
    if records:
        try:
            deliver(api.producer, api.topic, records, DELIVERY_WAIT_S)
        except BrokerError as e:
            log.warning("POST /v1/telemetry: Kafka did not take %d messages: %s", len(records), e)
            raise HTTPException(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                detail=f"Kafka did not acknowledge the events; send the whole request "
                                       f"again later: {e}") from None
    return {"accepted": decoded.table.num_rows, "rejected": len(decoded.rejected),
            "reasons": [{"index": r.index, "reason": unwritable.get(r.index, r.reason)}
                        | ({} if r.sample is None else {"sample": r.sample}) for r in decoded.rejected]}
