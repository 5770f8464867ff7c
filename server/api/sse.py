"""Server-Sent Events framing: one JSON object per event, then `data: [DONE]` (as OpenAI does)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from server.api.errors import ApiError, error_body

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def sse_frames(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Frame `events`; an error after the headers went out becomes an error event."""
    try:
        # aclosing: when the client goes away this generator is closed, and the events
        # (and through them the engine request) must be closed with it, not left to the GC.
        async with contextlib.aclosing(events):
            async for payload in events:
                yield sse_event(payload)
    except ApiError as e:
        yield sse_event(error_body(e.status, e.message, e.kind))
    except Exception as e:  # noqa: BLE001 - the status line is sent; tell the client in-band
        log.exception("stream failed")
        yield sse_event(error_body(500, f"internal error ({type(e).__name__}); see the server log"))
    yield DONE


def sse_response(events: AsyncIterator[dict]) -> StreamingResponse:
    # X-Accel-Buffering: a buffering reverse proxy (nginx) would hold the tokens back.
    return StreamingResponse(sse_frames(events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
