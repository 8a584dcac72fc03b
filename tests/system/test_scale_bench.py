"""The scale suite's machinery: traffic schedules, and the load generator against a real server
process on a loopback port (mixed batches, binary bodies), bounded in count."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bench.common import dir_store
from bench.scale import Server, make_paths, one_image, schedule
from tests.conftest import tiny_card, tiny_weights
from zoo_store.core.bundle import decode_bundle


def test_schedules_are_seeded_and_zipf_is_skewed() -> None:
    uniform, zipf = schedule(256, 4096, "uniform"), schedule(256, 4096, "zipf")
    assert uniform == schedule(256, 4096, "uniform") and len(uniform) == 4096
    assert max(Counter(uniform).values()) < 0.02 * 4096  # about 16 each
    assert max(Counter(zipf).values()) > 0.1 * 4096  # the head path draws about 16% of the traffic
    assert set(uniform) <= set(range(256)) and set(zipf) <= set(range(256))


def _served(tmp_path: Path) -> tuple[list[str], bytes]:
    store = dir_store(tmp_path)
    store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    ids = [store.save_path(decode_bundle(b))[0].id for b in make_paths(store, "res", 3)]
    return ids, one_image(store.card("res").input)[1]


def test_wrk_drives_a_real_server(tmp_path: Path) -> None:
    """The http and edge suites' load generator (wrk and its Lua script) against `zoo serve`, one
    second a run: /v1 predicts with both bodies, /v2 infers with binary tensors (a header of their own)."""
    from bench.edge import infer_body
    from bench.http import bodies, wrk

    ids, _ = _served(tmp_path)
    server = Server(tmp_path, workers=2)
    try:
        spec = dir_store(tmp_path).card("res").input
        for body, ctype in bodies(spec).values():
            r = wrk(server.url, ids, body, ctype, connections=4, seconds=1, work=tmp_path, key=server.key)
            assert r["requests"] > 0 and r["errors"] == 0 and 0 < r["p50_ms"] <= r["p99_ms"], r
        pixels = (one_image(spec)[0].numpy() * 255).round().astype("uint8")
        body, headers = infer_body(pixels)
        r = wrk(
            server.url,
            ids,
            body,
            "application/octet-stream",
            4,
            1,
            tmp_path,
            server.key,
            "/v2/models/%s/infer",
            headers,
            max_requests=100_000,
        )
        assert r["requests"] > 0 and r["errors"] == 0, r
    finally:
        server.close()


def test_load_through_a_real_server(tmp_path: Path) -> None:
    ids, body = _served(tmp_path)
    server = Server(tmp_path, "mixed")
    try:
        result = server.load(ids, [i % 3 for i in range(60)], body, concurrency=6)
        assert result["requests"] == 60 and result["errors"] == 0 and result["per_second"] > 0
        assert 0 < result["p50_ms"] <= result["p99_ms"]
        metrics = server.client.get("/metrics").text
        loads = [line for line in metrics.splitlines() if line.startswith("zoo_path_slot_loads_total")]
        assert loads and float(loads[0].split()[-1]) == 3  # each path copied into a slot once
        assert server.rss() > 0
        # more connections than requests (a warm pass over one path): the idle ones stop, none fails
        few = server.load(ids, [1], body, concurrency=64)
        assert few["requests"] == 1 and few["errors"] == 0
    finally:
        server.close()
    assert server.proc.poll() is not None


def test_a_cut_short_logs_figures_become_a_table() -> None:
    from bench.scale import Point, log_table, points_from_log

    one = Point("b", "mixed", "batcher", 1, "uniform", 100.0, 2.0, 4.0)
    many = Point("b", "mixed", "batcher", 16, "zipf", 90.0, 3.0, 8.0)
    head, tail = str(many).split(" n=")
    wrapped = f"scale: {one}\nnoise\nscale: {head}\n   n={tail}\n"  # the console wraps long lines at spaces
    assert points_from_log(wrapped) == [one, many]
    rows = log_table(wrapped)
    assert rows[-1] == "| batcher | mixed | 16 | zipf | 1 | **0.90x** | 1.50x | 2.00x | 90 | 3.00 | 8.00 |"


def test_repeated_runs_become_mean_and_spread_and_zipf_is_paired_with_uniform() -> None:
    from bench.scale import FULL, Point, _ratio_table, _references, runs, zipf_against_uniform

    assert runs(FULL, "mixed")[:6] == [
        (0, "uniform"),
        (0, "zipf"),
        (1, "zipf"),
        (1, "uniform"),
        (2, "uniform"),
        (2, "zipf"),
    ]
    assert runs(FULL, "per-path") == [(0, "uniform"), (0, "zipf")]
    pts = [Point("b", "mixed", "http", 1, t, 100.0, 2.0, 4.0) for t in ("uniform", "zipf")]
    pts += [Point("b", "mixed", "http", 16, "uniform", r, 2.0, 4.0) for r in (80.0, 100.0)]
    pts += [Point("b", "mixed", "http", 16, "zipf", r, 2.0, 4.0) for r in (88.0, 90.0)]
    pts += [Point("b", "per-path", "http", n, "zipf", 50.0, 2.0, 4.0) for n in (1, 16)]  # not in the paired line
    rows = _ratio_table(pts[:-2], _references(pts[:-2]), absolute=False)
    assert rows[4] == "| http | mixed | 16 | uniform | 2 | **0.90x ± 0.14** | 1.00x ± 0.00 | 1.00x ± 0.00 |"
    assert rows[5] == "| http | mixed | 16 | zipf | 2 | **0.89x ± 0.01** | 1.00x ± 0.00 | 1.00x ± 0.00 |"
    assert zipf_against_uniform(pts) == [
        "\nZipf against uniform, mixed executor (throughput, paired runs): http 16: 1.00x ± 0.14."
    ]
