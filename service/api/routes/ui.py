"""The dashboard: static files installed with the package (``service/api/static``), no build step."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(include_in_schema=False)


@router.get("/")
def dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html")


def static_files() -> StaticFiles:
    """Mounted at /ui: the page's script and style."""
    return StaticFiles(directory=STATIC)
