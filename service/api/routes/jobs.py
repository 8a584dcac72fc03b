from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.auth import CallerDep
from service.api.deps import Cursor, Limit, Svc
from service.api.schemas import Job, Page
from service.common.edge import bearer_key
from zoo_store.core.errors import NotFound, Unauthorized, Unavailable
from zoo_store.store.store import TERMINAL

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("")
def list_jobs(
    svc: Svc, caller: CallerDep, cursor: Cursor = None, limit: Limit = 100, state: str | None = None
) -> Page[Job]:
    """This key's tenant's jobs (an admin: every tenant's), without their curves (a job's own GET has them)."""
    rows, nxt = svc.store.list_jobs(cursor, limit, state, caller.visible_to)
    return Page(items=[Job.of(r, curve=False) for r in rows], next_cursor=nxt)


@router.get("/{job_id}")
def get_job(job_id: str, svc: Svc, caller: CallerDep) -> Job:
    return Job.of(svc.store.job(job_id, caller.visible_to))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, svc: Svc, caller: CallerDep) -> Job:
    """Cancel: a queued job stops at once, a running one at its next step. The job stays readable
    (``GET`` answers it, with state ``cancelled``); an ended job is answered as it is."""
    svc.store.job(job_id, caller.visible_to)
    svc.runner.cancel(job_id)
    return Job.of(svc.store.job(job_id))


@router.delete("/{job_id}", status_code=204)
def delete_job(job_id: str, svc: Svc, caller: CallerDep) -> Response:
    """Delete a job (one queued or running is cancelled first): ``GET`` and its events answer 404
    from then on. The path it made stays."""
    svc.store.job(job_id, caller.visible_to)
    svc.runner.delete(job_id)
    return Response(status_code=204)


class EventStream(StreamingResponse):
    """Server-sent events (the media type the OpenAPI document declares for them)."""

    media_type = "text/event-stream"


EVENTS = {
    200: {
        "description": "Server-sent events: `job` (the job as `GET` answers it) each time it "
        "changes, then one `end` (its final state, or what ended the stream)",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


@router.get("/{job_id}/events", response_class=EventStream, responses=EVENTS)
async def job_events(job_id: str, request: Request, svc: Svc, caller: CallerDep) -> EventStream:
    """Server-sent events: the job each time it changes, until it ends (or is deleted, or the key
    stops working); while the database is unreachable, the stream waits."""
    await run_in_threadpool(svc.store.job, job_id, caller.visible_to)  # 404 before the stream starts
    key = bearer_key(request.headers.get("authorization"))

    async def stream() -> AsyncIterator[str]:
        last = None
        while True:
            try:
                await run_in_threadpool(svc.auth.caller, key)  # revoked or expired since it began: it ends
                job = Job.of(await run_in_threadpool(svc.store.job, job_id))
            except (Unauthorized, NotFound) as e:
                yield f"event: end\ndata: {json.dumps({'error': e.detail})}\n\n"
                return
            except Unavailable:  # the database away for a moment (an unseen key: too): the stream waits for it
                await asyncio.sleep(1)
                continue
            body = job.model_dump_json()
            if body != last:
                yield f"event: job\ndata: {body}\n\n"
                last = body
            if job.state in TERMINAL:
                yield f"event: end\ndata: {json.dumps({'state': job.state})}\n\n"
                return
            await asyncio.sleep(0.25)

    return EventStream(stream(), headers={"Cache-Control": "no-cache"})
