"""The edge suite: `zoo serve` as started by default (one HTTP worker per core in front of one
inference process; the demo zoo, ``ZOO_DEMO_SAMPLES=1000``, built on the first start in a data
directory of its own) measured from outside: each process's resident memory after 1,000 predicts
and after the wrk runs, and wrk's throughput with binary tensors at 64 connections for
``/v2/models/{id}/infer`` (the Open Inference Protocol's binary tensor extension) against
``/v1/paths/{id}/predict`` (``.npy``) on the same server, in alternating rounds.

``python -m bench.edge --checkout DIR`` measures the server of another source tree (a commit before
a change, checked out with ``git worktree add``) with this suite's load and prints the figures."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.common import Say
from bench.http import wrk
from bench.scale import Server, _rss_of, dir_store, make_paths, one_image
from service.common.procs import descendants
from zoo_store.core.bundle import decode_bundle

BASE = "resnet-mnist"
CONNECTIONS = 64
MiB = 2**20


def infer_body(npy_pixels) -> tuple[bytes, dict[str, str]]:
    """An infer request of ``npy_pixels`` (N, C, H, W uint8) as a binary tensor, asking for binary
    outputs; and its headers."""
    raw = npy_pixels.tobytes()
    binary = {"binary_data": True}
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "UINT8",
                    "shape": list(npy_pixels.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": binary}, {"name": "label", "parameters": binary}],
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def processes(server: Server) -> list[tuple[str, int, int]]:
    """(role, pid, RSS bytes) of the supervisor and each of its processes."""
    out = [("supervisor", server.proc.pid, _rss_of(server.proc.pid))]
    for pid, cmd in sorted(descendants(server.proc.pid).items()):
        if "resource_tracker" in cmd:
            role = "resource tracker"
        elif "spawn_main" in cmd:
            role = "HTTP worker"
        elif ".infer" in cmd:
            role = "inference process"
        else:
            role = "other"
        out.append((role, pid, _rss_of(pid)))
    return out


def measure(say: Say, quick: bool, checkout: Path | None = None) -> dict:
    """Every figure of the suite, from a fresh server (served from ``checkout`` when given)."""
    rounds, seconds = (1, 4) if quick else (3, 10)
    data_dir = Path(tempfile.mkdtemp(prefix="zoo-edge-", dir="/tmp"))
    work = data_dir / "wrk"
    work.mkdir()
    say(f"edge: starting zoo serve on {data_dir} (first start: the demo zoo is built, about a minute)")
    server = Server(data_dir, checkout=checkout, ready_s=1200, ZOO_DEMO_ZOO="true", ZOO_DEMO_SAMPLES="1000")
    try:
        bundle = make_paths(dir_store(data_dir), BASE, 1)[0]
        server.client.post("/v1/paths/import", content=bundle).raise_for_status()
        pid = decode_bundle(bundle).id
        x, npy = one_image(dir_store(data_dir).card(BASE).input)
        pixels = (x.numpy() * 255).round().astype("uint8")  # the same image as the .npy body
        infer, infer_headers = infer_body(pixels)
        say("edge: 1,000 predicts (.npy, 16 connections)")
        server.load([pid], [0] * 1000, npy, 16)
        after_predicts = processes(server)
        octet = "application/octet-stream"
        runs = {"v1": ("/v1/paths/%s/predict", npy, {}), "v2": ("/v2/models/%s/infer", infer, infer_headers)}
        for route, body, headers in runs.values():  # warm: every worker has described the path
            wrk(server.url, [pid], body, octet, CONNECTIONS, 2, work, server.key, route, headers, 20_000)
        points: dict[str, list[dict]] = {"v1": [], "v2": []}
        for r in range(rounds):
            for name, (route, body, headers) in runs.items():
                say(f"edge: round {r + 1} of {rounds}, {name}, {CONNECTIONS} connections, {seconds} s")
                result = wrk(
                    server.url, [pid], body, octet, CONNECTIONS, seconds, work, server.key, route, headers, 200_000
                )
                if result["errors"]:
                    raise RuntimeError(f"{result['errors']} of wrk's requests to {route} failed")
                points[name].append(result)
        after_wrk = processes(server)
    finally:
        server.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"after_predicts": after_predicts, "after_wrk": after_wrk, "points": points, "seconds": seconds}


def lines(m: dict) -> list[str]:
    """The figures as markdown: each process's RSS, then the throughput of each round."""
    out = [
        f"`zoo serve` with its defaults ({os.cpu_count()} HTTP workers, one per core), the demo zoo "
        f"(`ZOO_DEMO_SAMPLES=1000`, built on the first start), one reprogram path on {BASE}; one "
        f"28 x 28 image a request, binary tensors both ways (`/v1`: a `.npy` body; `/v2`: UINT8 with "
        f"`binary_data_size`, both outputs binary). wrk: 1 thread, {CONNECTIONS} connections, "
        f"{m['seconds']} s a run, `/v1` and `/v2` alternating.\n",
        "| process | RSS after 1,000 predicts | after the wrk runs |",
        "|---|---:|---:|",
    ]
    later = {pid: rss for _, pid, rss in m["after_wrk"]}
    for role, pid, rss in m["after_predicts"]:
        out.append(f"| {role} | {rss / MiB:,.0f} MiB | {later.get(pid, 0) / MiB:,.0f} MiB |")
    v1, v2 = ([p["per_second"] for p in m["points"][k]] for k in ("v1", "v2"))
    out += ["", "| route | requests/s (each run) | mean | p50 ms | p99 ms |", "|---|---|---:|---:|---:|"]
    for name, route in (("v1", "`/v1/paths/{id}/predict`"), ("v2", "`/v2/models/{id}/infer`")):
        pts = m["points"][name]
        each = ", ".join(f"{p['per_second']:,.0f}" for p in pts)
        mean = statistics.fmean(p["per_second"] for p in pts)
        p50, p99 = (statistics.median(p[q] for p in pts) for q in ("p50_ms", "p99_ms"))
        out.append(f"| {route} | {each} | {mean:,.0f} | {p50:.1f} | {p99:.1f} |")
    ratio = statistics.fmean(v2) / statistics.fmean(v1)
    out.append(f"\n`/v2` / `/v1`: **{ratio:.2f}x** (means of the runs).")
    return out


def edge_suite(say: Say, quick: bool) -> list[str]:
    return lines(measure(say, quick))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, help="the source tree to serve from (default: this one)")
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    m = measure(print, args.quick, args.checkout)
    if args.json:
        args.json.write_text(json.dumps(m, indent=1))
    print("\n".join(lines(m)))


if __name__ == "__main__":
    main()
