"""The scale suite's machinery: traffic schedules, and the load generator against a real server
process on a loopback port (mixed batches, binary bodies), bounded in count."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from service.bench.common import dir_store
from service.bench.scale import Server, make_paths, one_image, schedule
from tests.conftest import tiny_card, tiny_weights
from zoo_store.paths import decode_bundle


def test_schedules_are_seeded_and_zipf_is_skewed() -> None:
    uniform, zipf = schedule(256, 4096, "uniform"), schedule(256, 4096, "zipf")
    assert uniform == schedule(256, 4096, "uniform") and len(uniform) == 4096
    assert max(Counter(uniform).values()) < 0.02 * 4096  # about 16 each
    assert max(Counter(zipf).values()) > 0.1 * 4096  # the head path draws about 16% of the traffic
    assert set(uniform) <= set(range(256)) and set(zipf) <= set(range(256))


def test_load_through_a_real_server(tmp_path: Path) -> None:
    store = dir_store(tmp_path)
    store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    bundles = make_paths(store, "res", 3)
    for b in bundles:
        store.save_path(decode_bundle(b))
    ids = [decode_bundle(b).id for b in bundles]
    _, body = one_image(store.card("res").input)
    server = Server(tmp_path, "mixed")
    try:
        result = server.load(ids, [i % 3 for i in range(60)], body, concurrency=6)
        assert result["requests"] == 60 and result["errors"] == 0 and result["per_second"] > 0
        assert 0 < result["p50_ms"] <= result["p99_ms"]
        metrics = server.client.get("/metrics").text
        loads = [line for line in metrics.splitlines() if line.startswith("zoo_path_slot_loads_total")]
        assert loads and float(loads[0].split()[-1]) == 3  # each path copied into a slot once
        assert server.rss() > 0
    finally:
        server.close()
    assert server.proc.poll() is not None
