"""``zoo models build``: a zoo trained into the store of ZOO_DATA_DIR, its domain on every card,
a second run a no-op that says so. Run on a tiny budget (one family, a few images, one epoch)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service import cli
from zoo_store.core.settings import Settings
from zoo_store.store.db import Database
from zoo_store.store.store import Store
from zoo_store.store.zoos import COMPLEMENTARY_BASES, FAMILIES, ZOOS, Zoo, family_bases


def test_the_complementary_zoo_is_four_families_on_four_domains_at_two_widths() -> None:
    assert len(FAMILIES) == 4 and len(COMPLEMENTARY_BASES) == 8
    assert len({f.arch for f in FAMILIES}) == len({f.dataset for f in FAMILIES}) == 4
    assert {f.dataset for f in FAMILIES} == {"mnist", "letters", "shapes", "textures"}
    for f in FAMILIES:
        narrow, wide = family_bases(f)
        assert narrow.arch == wide.arch == f.arch and narrow.dataset == wide.dataset == f.dataset
        assert sum(narrow.config["widths"]) < sum(wide.config["widths"])


def _store(data_dir: Path) -> Store:
    settings = Settings(data_dir=data_dir)
    return Store.open(settings, Database(settings.db_url))


def test_build_registers_the_bases_with_their_domain_and_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    textures = next(f for f in FAMILIES if f.dataset == "textures")
    tiny = family_bases(dataclasses.replace(textures, per_label=4), epochs=1)
    monkeypatch.setitem(ZOOS, "tiny", Zoo(tiny, "tiny zoo"))
    for name in ("ZOO_DATABASE_URL", "ZOO_BLOB_STORE", "ZOO_MODE"):
        monkeypatch.delenv(name, raising=False)
    env = {"ZOO_DATA_DIR": str(tmp_path), "COLUMNS": "200"}

    first = CliRunner().invoke(cli.app, ["models", "build", "tiny"], env=env)
    assert first.exit_code == 0, first.output
    cards = _store(tmp_path).cards()
    assert sorted(cards) == sorted(b.id for b in tiny) == ["textures-convnext-narrow", "textures-convnext-wide"]
    for b in tiny:
        card = cards[b.id]
        assert textures.domain in card.description and "test split: textures" in card.description
        assert card.arch == "convnext_s" and card.arch_config == b.config and len(card.labels) == 18
        assert card.metrics["train_samples"] == 4 * 18 and card.metrics["test_samples"] == 200 * 18
        assert 0 <= card.metrics["accuracy"] <= 1
        assert f"| {b.id} | convnext_s |" in first.output and f"{card.metrics['accuracy']:.4f} |" in first.output
    assert "trained 2 bases" in first.output

    second = CliRunner().invoke(cli.app, ["models", "build", "tiny"], env=env)
    assert second.exit_code == 0, second.output
    assert "already built, nothing to do" in second.output and "training" not in second.output
    assert {k: c.digest for k, c in _store(tmp_path).cards().items()} == {k: c.digest for k, c in cards.items()}
    assert second.output.split("\n", 1)[1] == first.output[first.output.index("| base |") :]  # the same table


def test_an_unknown_zoo_is_a_one_line_mistake(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli.app, ["models", "build", "nope"], env={"ZOO_DATA_DIR": str(tmp_path)})
    assert r.exit_code == 2 and "no zoo 'nope'" in r.output and "complementary" in r.output
