"""Annotated dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from service.api.state import Services
from zoo_store.core.errors import Unavailable


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_ready_services(request: Request) -> Services:
    svc: Services = request.app.state.services
    if not svc.ready.is_set():
        raise Unavailable(svc.startup_error or "the zoo is still loading; see /readyz")
    return svc


Svc = Annotated[Services, Depends(get_services)]
ReadySvc = Annotated[Services, Depends(get_ready_services)]
Cursor = Annotated[str | None, Query(max_length=100, description="next_cursor of the previous page")]
Limit = Annotated[int, Query(ge=1, le=500)]
