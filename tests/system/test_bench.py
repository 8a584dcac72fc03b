"""The pieces of ``zoo bench`` that do not need the demo zoo: doc blocks, path siblings, byte ratios."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from bench.common import END, START, path_variants, reprogram_bytes, write_block
from tests.helpers import compose, reprogram_spec, tensor_inputs


def test_write_block_keeps_the_prose(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "b.md"
    write_block(doc, "Benchmarks", "first")
    assert doc.read_text() == f"# Benchmarks\n\n{START}\nfirst\n{END}\n"
    doc.write_text(doc.read_text().replace("# Benchmarks\n", "# Benchmarks\n\nProse above.\n") + "\nProse below.\n")
    write_block(doc, "Benchmarks", "second")
    text = doc.read_text()
    assert "Prose above." in text and "Prose below." in text and "second" in text and "first" not in text
    write_block(doc, "Benchmarks", "scale figures", name="scale")  # a second block, after the first
    write_block(doc, "Benchmarks", "third")
    text = doc.read_text()
    assert "scale figures" in text and "third" in text and "second" not in text
    assert text.index("third") < text.index("<!-- bench:scale:start -->") < text.index("scale figures")


def test_path_variants_are_distinct_imports_of_the_same_cost(app_client: TestClient) -> None:
    pid = compose(app_client, reprogram_spec())["path_id"]
    ids = path_variants(app_client, pid, 3)
    assert ids[0] == pid and len(set(ids)) == 3
    body = {"inputs": tensor_inputs(2)}
    scores = [app_client.post(f"/v1/paths/{p}/predict", json=body).json()["predictions"][0]["score"] for p in ids]
    assert all(abs(s - scores[0]) < 0.05 for s in scores)  # siblings: same net, a shifted head bias
    sizes = {app_client.get(f"/v1/paths/{p}").json()["bytes"] for p in ids}
    assert len(sizes) == 1


def test_reprogram_bytes_are_a_small_share() -> None:
    stored, dense = reprogram_bytes("resnet_s", 28, 1)
    assert 0 < stored < 0.02 * dense
