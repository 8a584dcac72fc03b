"""The one Settings object. Every knob is an environment variable prefixed ``ZOO_``."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZOO_", extra="ignore")

    data_dir: Path = Path("./data")
    database_url: str | None = None  # default: SQLite under data_dir
    redis_url: str = "redis://127.0.0.1:6379/0"
    mode: Literal["embedded", "distributed"] = "embedded"
    demo_zoo: bool = True
    demo_samples: int = Field(12_000, ge=500)  # MNIST images per demo base (train split)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # runtime
    cache_bytes: int = 256 * 2**20  # LRU budget for materialized paths (delta bytes)
    pinned_paths: list[str] = []  # materialized at start and never evicted (JSON list in the env)
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    max_predict_inputs: int = 256
    # limits on what users send
    max_body_bytes: int = 16 * 2**20
    max_upload_bytes: int = 64 * 2**20
    max_image_bytes: int = 4 * 2**20
    max_image_side: int = 2048
    # jobs
    job_workers: int = 1  # concurrent composition jobs in embedded mode
    job_executor: Literal["process", "thread"] = "process"

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'zoo.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
