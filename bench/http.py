"""The HTTP suite: `zoo serve` (HTTP workers in front of one inference process) under wrk, a C
load generator driven by a Lua script, single-image predicts with JSON and ``.npy`` bodies over
1 and 1,024 paths at 16-256 connections; beside it, in the same run, the inference loop alone
on the same path (images/s), and the cost of each step of a request's parsing and answering."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from bench.common import Say, demo_store, dir_store, timeit
from bench.scale import Server, closed_loop, fresh_dir, make_paths, one_image, settings_for
from service.api.bodies import PredictRequest, PredictResponse, predictions
from service.api.inputs import npy_input, tensor_input
from service.api.state import Services
from zoo_store.core.bundle import decode_bundle
from zoo_store.core.settings import Settings

WRK_SCRIPT = """
local paths = {}
for line in io.lines(os.getenv("ZOO_WRK_PATHS")) do paths[#paths + 1] = line end
local f = io.open(os.getenv("ZOO_WRK_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("ZOO_WRK_TYPE")
wrk.headers["Authorization"] = os.getenv("ZOO_WRK_AUTH")
for name, value in string.gmatch(os.getenv("ZOO_WRK_HEADERS") or "", "([^:\\n]+): ([^\\n]*)") do
  wrk.headers[name] = value
end
local route = os.getenv("ZOO_WRK_ROUTE")
request = function()
  return wrk.format(nil, string.format(route, paths[math.random(#paths)]))
end
local cap = tonumber(os.getenv("ZOO_WRK_MAX") or "")
if cap then  -- bounded in count as well as in time
  local answered = 0
  response = function(status, headers, body)
    answered = answered + 1
    if answered >= cap then wrk.thread:stop() end
  end
end
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format('ZOO {"requests": %d, "seconds": %f, "p50_ms": %f, "p99_ms": %f, "errors": %d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, errors))
end
"""


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("`zoo bench --suite http` needs wrk: apt-get install -y wrk (Debian's package)")
    return found


def wrk(
    url: str,
    ids: list[str],
    body: bytes,
    ctype: str,
    connections: int,
    seconds: int,
    work: Path,
    key: str,
    route: str = "/v1/paths/%s/predict",
    headers: dict[str, str] | None = None,
    max_requests: int | None = None,
) -> dict:
    """``seconds`` of POSTs of ``body`` to ``route`` (``%s``: a path of ``ids``, drawn uniformly) over
    ``connections`` connections; no more than ``max_requests`` are sent (a bound: a run that reaches
    it still lasts ``seconds``, so its rate is understated)."""
    (work / "paths.txt").write_text("\n".join(ids) + "\n")
    (work / "body").write_bytes(body)
    (work / "zoo.lua").write_text(WRK_SCRIPT)
    env = {
        **os.environ,
        "ZOO_WRK_PATHS": str(work / "paths.txt"),
        "ZOO_WRK_BODY": str(work / "body"),
        "ZOO_WRK_TYPE": ctype,
        "ZOO_WRK_AUTH": f"Bearer {key}",
        "ZOO_WRK_ROUTE": route,
        "ZOO_WRK_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items()),
    }
    if max_requests is not None:
        env["ZOO_WRK_MAX"] = str(max_requests)
    cmd = [wrk_path(), "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(work / "zoo.lua"), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("ZOO "))
    result = json.loads(line[4:])
    result["per_second"] = result["requests"] / result["seconds"]
    return result


def bodies(spec) -> dict[str, tuple[bytes, str]]:
    x, npy = one_image(spec)
    as_json = json.dumps({"inputs": [{"tensor": x[0].tolist()}]}).encode()
    return {"binary": (npy, "application/octet-stream"), "json": (as_json, "application/json")}


def http_suite(say: Say, quick: bool) -> list[str]:
    conns, seconds, many = ((16, 64), 5, 64) if quick else ((16, 64, 256), 12, 1024)
    workers = os.cpu_count() or 1
    store = demo_store(say, quick)
    base_id = "resnet-mnist"
    fresh = fresh_dir(store, base_id)
    target = dir_store(fresh)
    bundles = make_paths(store, base_id, many)
    ids = [target.save_path(decode_bundle(b))[0].id for b in bundles]
    spec = target.card(base_id).input
    say("http: the inference loop alone on one path")
    loop_rate = _loop_rate(fresh, base_id, ids[0])
    lines = [
        (
            f"`zoo serve` with {workers} HTTP workers (one per core) in front of one inference process, "
            f"{base_id}, single-image predicts; wrk (1 thread, {seconds} s a point, closed loop) picks a path "
            f"uniformly per request. *loop*: the inference loop alone in process on one path, 4,096 requests "
            f"at concurrency 256, in this run: {loop_rate:,.0f} images/s on this CPU. Ratio: HTTP requests/s "
            f"over that.\n"
        ),
        "| body | paths | connections | requests/s | HTTP / loop | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    server = Server(fresh, workers=workers)
    url = server.url
    work = Path(tempfile.mkdtemp(prefix="zoo-wrk-"))
    try:
        for name, (body, ctype) in bodies(spec).items():
            for n in (1, many):
                wrk(url, ids[:n], body, ctype, 16, 2, work, server.key)  # warm: slots loaded, workers' caches filled
                for c in conns:
                    say(f"http: {name} body, {n} paths, {c} connections")
                    r = wrk(url, ids[:n], body, ctype, c, seconds, work, server.key)
                    errors = f" ({r['errors']} errors)" if r["errors"] else ""
                    lines.append(
                        f"| {name} | {n:,} | {c} | {r['per_second']:,.0f}{errors} | "
                        f"**{r['per_second'] / loop_rate:.2f}x** | "
                        f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
                    )
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    lines.append("\n(Latencies on this 2-core CPU, where wrk, the workers and the inference process share the cores.)")
    return [*lines, "", *parse_profile(spec, loop_rate)]


def _loop_rate(data_dir: Path, base_id: str, path_id: str) -> float:
    svc = Services.create(settings_for(data_dir, "mixed"))
    try:
        svc.zoo.add(svc.store.card(base_id))
        x, _ = one_image(svc.store.card(base_id).input)
        asyncio.run(closed_loop(svc, [path_id], [0] * 1024, 256, x))  # warm
        rate, _ = asyncio.run(closed_loop(svc, [path_id], [0] * 4096, 256, x))
        return rate
    finally:
        svc.stop()


def parse_profile(spec, loop_rate: float) -> list[str]:
    """Each step of a single-image predict's parsing and answering, as a share of one image's
    forward time in the inference loop (1 / loop images/s)."""
    import orjson

    settings = Settings(demo_zoo=False)
    body = bodies(spec)
    labels = tuple(str(i) for i in range(10))
    probs = torch.rand(1, 10).softmax(-1).numpy()
    answer = predictions("p_" + "0" * 32, labels, probs, 1)
    values = PredictRequest.model_validate_json(body["json"][0]).inputs[0].tensor
    steps = {
        "JSON body -> request model (pydantic-core)": lambda: PredictRequest.model_validate_json(body["json"][0]),
        "request model tensor -> (C, H, W) via numpy": lambda: tensor_input(values, spec, 0),
        "the same via torch.tensor(nested lists) (before)": lambda: torch.tensor(values, dtype=torch.float32),
        ".npy body -> (N, C, H, W)": lambda: npy_input(body["binary"][0], spec, settings),
        "answer -> JSON bytes (orjson, plain data)": lambda: orjson.dumps(answer),
        "answer -> JSON bytes (pydantic model, before)": lambda: PredictResponse.model_validate(
            answer
        ).model_dump_json(),
    }
    per_image = 1 / loop_rate
    intro = (
        "Parsing profile: each step of one single-image predict, as a share of one image's forward time in "
        "the inference loop (median of 200 runs, this process):\n"
    )
    lines = [intro, "| step | share of a forward |", "|---|---:|"]
    for name, fn in steps.items():
        lines.append(f"| {name} | {timeit(fn, repeat=200, warmup=20) / per_image:.2f}x |")
    return lines
