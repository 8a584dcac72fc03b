"""A closed-loop HTTP load generator, run in its own process so it does not share the server's
interpreter: ``python -m bench.loadgen < job.json`` prints one JSON result line.

The job: ``{"host", "port", "paths": [...], "schedule": [path index per request], "concurrency",
"body_b64", "content_type", "query", "authorization"}`` (the last two optional). Each of ``concurrency``
keep-alive connections sends its next request as soon as the previous answer arrives, until the schedule
is spent (bounded in count).
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import sys
import time


async def _connection(job: dict, todo: list[int], body: bytes, latencies: list[float], errors: list[str]) -> None:
    auth = f"Authorization: {job['authorization']}\r\n" if job.get("authorization") else ""
    head = (
        f"Host: {job['host']}\r\n{auth}Content-Type: {job['content_type']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer = None
    try:
        while todo:
            if writer is None:
                reader, writer = await asyncio.open_connection(job["host"], job["port"])
                if not todo:  # the other connections took the rest meanwhile
                    break
            path_id = job["paths"][todo.pop()]
            t = time.perf_counter()
            try:
                writer.write(
                    f"POST /v1/paths/{path_id}/predict{job.get('query', '')} HTTP/1.1\r\n".encode() + head + body
                )
                status, length = await _response_head(reader)
                payload = await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError) as e:  # the server dropped the connection: a failed request
                errors.append(f"connection lost: {e!r}")
                writer.close()
                writer = None
                continue
            latencies.append(time.perf_counter() - t)
            if status != 200:
                errors.append(f"{status}: {payload[:200].decode(errors='replace')}")
    finally:
        if writer is not None:
            writer.close()


async def _response_head(reader: asyncio.StreamReader) -> tuple[int, int]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length")
    return status, length


async def run(job: dict) -> dict:
    body = base64.b64decode(job["body_b64"])
    todo = list(reversed(job["schedule"]))  # pop() takes them in schedule order
    latencies: list[float] = []
    errors: list[str] = []
    t = time.perf_counter()
    await asyncio.gather(*(_connection(job, todo, body, latencies, errors) for _ in range(job["concurrency"])))
    seconds = time.perf_counter() - t
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "sent": len(job["schedule"]),
        "requests": len(latencies),
        "seconds": seconds,
        "per_second": len(latencies) / seconds,
        "p50_ms": 1e3 * q[49],
        "p99_ms": 1e3 * q[98],
        "errors": len(errors),
        "first_error": errors[:1],
    }


def main() -> None:
    job = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(run(job))))


if __name__ == "__main__":
    main()
