from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.api.auth import CallerDep
from service.api.deps import Cursor, Limit, Svc
from service.api.schemas import Job, Page
from service.common.edge import bearer_key
from zoo_store.core.errors import Unauthorized
from zoo_store.store.store import TERMINAL

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("")
def list_jobs(svc: Svc, caller: CallerDep, cursor: Cursor = None, limit: Limit = 100, state: str | None = None) -> Page[Job]:
    """This key's tenant's jobs (an admin: every tenant's)."""
    rows, nxt = svc.store.list_jobs(cursor, limit, state, caller.visible_to)
    return Page(items=[Job.of(r) for r in rows], next_cursor=nxt)


@router.get("/{job_id}")
def get_job(job_id: str, svc: Svc, caller: CallerDep) -> Job:
    return Job.of(svc.store.job(job_id, caller.visible_to))


@router.delete("/{job_id}")
def cancel_job(job_id: str, svc: Svc, caller: CallerDep) -> Job:
    """Cancel: a queued job stops at once, a running one at its next step. The job stays readable
    (``GET`` answers it, with state ``cancelled`` once it stopped); an ended job is answered as it is."""
    svc.store.job(job_id, caller.visible_to)
    svc.runner.cancel(job_id)
    return Job.of(svc.store.job(job_id))


@router.get("/{job_id}/events")
async def job_events(job_id: str, request: Request, svc: Svc, caller: CallerDep) -> StreamingResponse:
    """Server-sent events: the job each time it changes, until it ends (or the key stops working)."""
    svc.store.job(job_id, caller.visible_to)  # 404 before the stream starts
    key = bearer_key(request.headers.get("authorization"))

    async def stream() -> AsyncIterator[str]:
        last = None
        while True:
            try:
                svc.auth.caller(key)  # revoked or expired since the stream began: it ends
            except Unauthorized as e:
                yield f"event: end\ndata: {json.dumps({'error': e.detail})}\n\n"
                return
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
