from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.deps import Cursor, Limit, Svc
from service.schemas import Job, Page
from zoo_store.store import TERMINAL

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("")
def list_jobs(svc: Svc, cursor: Cursor = None, limit: Limit = 100, state: str | None = None) -> Page[Job]:
    rows, nxt = svc.store.list_jobs(cursor, limit, state)
    return Page(items=[Job.of(r) for r in rows], next_cursor=nxt)


@router.get("/{job_id}")
def get_job(job_id: str, svc: Svc) -> Job:
    return Job.of(svc.store.job(job_id))


@router.delete("/{job_id}")
def cancel_job(job_id: str, svc: Svc) -> Job:
    """Cancel: a queued job stops at once, a running one at its next step. The job stays readable
    (``GET`` answers it, with state ``cancelled`` once it stopped); an ended job is answered as it is."""
    svc.runner.cancel(job_id)
    return Job.of(svc.store.job(job_id))


@router.get("/{job_id}/events")
async def job_events(job_id: str, svc: Svc) -> StreamingResponse:
    """Server-sent events: the job each time it changes, until it ends."""
    svc.store.job(job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        last = None
        while True:
            job = Job.of(await asyncio.to_thread(svc.store.job, job_id))
            body = job.model_dump_json()
            if body != last:
                yield f"event: job\ndata: {body}\n\n"
                last = body
            if job.state in TERMINAL:
                yield f"event: end\ndata: {json.dumps({'state': job.state})}\n\n"
                return
            await asyncio.sleep(0.25)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
