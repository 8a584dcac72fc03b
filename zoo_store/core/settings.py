"""The one Settings object. Every knob is an environment variable prefixed ``ZOO_``."""

from __future__ import annotations

import os
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
    auth: bool = True  # API keys on every route but /healthz, /readyz, /metrics (ZOO_AUTH=off: none, for experiments)
    # every tenant's limits unless set for it (PUT /v1/tenants/{tenant}/limits); admins' keys have none
    tenant_max_jobs: int = Field(8, ge=0)  # jobs queued or running at once
    tenant_max_paths: int = Field(100_000, ge=0)  # paths it owns
    tenant_max_path_bytes: int = Field(16 * 2**30, ge=0)  # bytes of the paths it owns
    tenant_max_dataset_bytes: int = Field(4 * 2**30, ge=0)  # bytes of the datasets it uploaded
    tenant_predict_rate: float = Field(200.0, ge=0.01)  # predict requests per second (token bucket) ...
    tenant_predict_burst: int = Field(400, ge=1)  # ... and at once (the bucket's size)
    # where base weights, datasets and other blobs live: "dir" (under data_dir) or "database" (chunked
    # rows, so that no two processes share a disk); default: dir embedded, database distributed
    blob_store: Literal["dir", "database"] | None = None
    # while the database is unreachable, a key's caller, a tenant's access to a path and its limits, read at
    # most this long ago, are still used (warm predicts go on); 0: never (every such check answers 503)
    outage_stale_s: float = Field(60.0, ge=0)
    zoo_poll_s: float = Field(2.0, gt=0)  # how often a process looks for bases registered through another
    jobs_stream: str = "zoo:jobs"  # distributed mode: the Redis stream of composition jobs
    job_claim_idle_s: float = Field(60.0, gt=0)  # a dead worker's job is taken over after this long
    # runtime
    cache_bytes: int = Field(256 * 2**20, gt=0)  # device budget: path slots + materialized paths (delta bytes)
    host_cache_bytes: int = Field(512 * 2**20, gt=0)  # host tier: decoded tensors of slot-served paths
    pinned_paths: list[str] = []  # materialized at start and never evicted (JSON list in the env)
    # "base": one forward serves a batch mixing the paths of one base where the method allows it
    # (reprogram), each sample with its own path's slot; "path": every path its own module and batches
    batching: Literal["base", "path"] = "base"
    max_batch_size: int = Field(64, gt=0)
    max_wait_ms: float = Field(2.0, ge=0)
    max_predict_inputs: int = Field(256, gt=0)
    # `zoo serve`: HTTP worker processes that parse and decode requests in front of the one inference
    # process that owns the device (0: everything in one process)
    http_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=0)
    # where browsers reach this server (`zoo serve` sets it from --host and --port unless it is set):
    # with auth on, the start prints <public_url>/#token=... once, a link that signs a browser in
    public_url: str | None = None
    sign_in_link: bool = True  # false: the start prints no sign-in link (zoo dashboard still makes them)
    # the edge (`zoo serve`'s HTTP server): request headers above this get 431; a request whose headers
    # do not arrive within read_timeout_s, or whose body stops for that long, gets 408 (and is closed)
    max_header_bytes: int = Field(64 * 2**10, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    # on SIGTERM: requests in flight are answered for at most drain_s, then cut; an idle keep-alive
    # connection is kept drain_idle_s more, and a request arriving on it is answered (Connection: close)
    drain_s: float = Field(20.0, gt=0)
    drain_idle_s: float = Field(1.0, ge=0)
    ipc_dir: Path | None = None  # set by `zoo serve` for its processes: where their sockets live
    shm_slot_bytes: int = Field(2**20, gt=0)  # per request in flight: tensors up to this go through shared memory
    shm_slots: int = Field(16, gt=0)  # per HTTP worker (larger or extra requests travel inline on the socket)
    # inputs waiting for the device beyond which predicts are refused at once (503 + Retry-After)
    max_queue_inputs: int = Field(2048, gt=0)
    # limits on what users send
    max_body_bytes: int = 16 * 2**20
    max_upload_bytes: int = 64 * 2**20  # a dataset upload
    max_base_bytes: int = 8 * 2**30  # a base's weights file: spooled to disk and read from there, never whole in memory
    max_image_bytes: int = 4 * 2**20
    max_image_side: int = 2048
    # jobs
    job_workers: int = 1  # concurrent composition jobs in embedded mode
    job_executor: Literal["process", "thread"] = "process"
    job_attempts: int = Field(3, ge=1)  # runs of a job that outages of the database or Redis cut short, then failed
    # `zoo worker` on SIGTERM: how long its running jobs may take to finish before they are handed back
    # (under the 10 s a service manager commonly waits before SIGKILL)
    job_stop_grace_s: float = Field(8.0, ge=0)

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'zoo.db').resolve()}"

    @property
    def blobs_in_database(self) -> bool:
        return (self.blob_store or ("database" if self.mode == "distributed" else "dir")) == "database"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"
