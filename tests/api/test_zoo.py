"""Zoo store: content-addressed bases, cards checked against the models they build, demo zoo."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from tests.conftest import make_settings, start_app, tiny_card, tiny_weights
from zoo_store.archs import build_arch
from zoo_store.core.cards import Card
from zoo_store.core.errors import Conflict
from zoo_store.core.keystore import sha256
from zoo_store.store.blobs import DirBlobStore
from zoo_store.store.db import Database
from zoo_store.store.demo import DEMO_BASES
from zoo_store.store.store import Store


@pytest.fixture
def store(tmp_path: Path, db_url: str) -> Store:
    db = Database(db_url)
    db.migrate()
    return Store(db, DirBlobStore(tmp_path / "blobs"))


def test_card_matches_model(store: Store) -> None:
    card, created = store.add_base(tiny_card("m", "mobilenet_s"), tiny_weights("mobilenet_s", 10))
    assert created
    net = store.load_base(card)
    assert card.num_params == sum(p.numel() for p in net.parameters())
    assert [t.model_dump() for t in card.taps] == [t.as_dict() for t in net.taps]
    assert len(card.labels) == net.num_classes
    assert card.digest == sha256(store.base_weights("m")) and card.bytes == len(store.base_weights("m"))
    assert store.cards()["m"] == card == Card.model_validate(card.model_dump(mode="json"))


def test_same_id_same_digest_is_idempotent_other_digest_conflicts(store: Store) -> None:
    store.add_base(tiny_card("r"), tiny_weights("resnet_s", 10))
    _, created = store.add_base(tiny_card("r"), tiny_weights("resnet_s", 10))
    assert not created
    with pytest.raises(Conflict, match="exists with digest"):
        store.add_base(tiny_card("r"), tiny_weights("resnet_s", 10, seed=1))


def test_pth_weights_only(store: Store) -> None:
    buf = io.BytesIO()
    torch.save(tiny_weights("vgg_s", 10), buf)
    card, _ = store.add_base(tiny_card("v", "vgg_s"), buf.getvalue())
    assert card.digest == sha256(save(dict(sorted(tiny_weights("vgg_s", 10).items()))))


def test_torchvision_weights_register(store: Store) -> None:
    """A user's torchvision state dict (here random) registers as-is under the tv adapter."""
    import torchvision

    from zoo_store.core.cards import CardIn, InputSpec

    state = torchvision.models.mobilenet_v3_small(num_classes=4).state_dict()
    rgb = InputSpec(channels=3, size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    card, _ = store.add_base(CardIn(id="tv", arch="tv_mobilenet_v3_small", labels=tuple("abcd"), input=rgb), state)
    assert card.taps[-1].channels == 1024
    net = store.load_base(card)
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 4)


def test_demo_zoo_builds_and_cards_check(tmp_path: Path) -> None:
    client = start_app(make_settings(tmp_path, demo_zoo=True, demo_samples=500))
    try:
        items = client.get("/v1/zoo/models").json()["items"]
        assert {m["id"] for m in items} == {b.id for b in DEMO_BASES}
        assert len({m["arch"] for m in items}) >= 3
        labels = {m["id"]: m["labels"] for m in items}
        assert labels["resnet-mnist-0-4"] == list("01234") and labels["resnet-mnist-5-9"] == list("56789")
        for m in items:
            assert 0.0 < m["metrics"]["accuracy"] <= 1.0
            net = build_arch(m["arch"], {"num_classes": len(m["labels"])})
            assert m["num_params"] == sum(p.numel() for p in net.parameters())
    finally:
        client.__exit__(None, None, None)
    again = start_app(make_settings(tmp_path, demo_zoo=True, demo_samples=500))  # a later start: nothing to train
    try:
        assert [m["digest"] for m in again.get("/v1/zoo/models").json()["items"]] == [m["digest"] for m in items]
    finally:
        again.__exit__(None, None, None)
