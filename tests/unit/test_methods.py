"""Contract tests run for every registered composition method, on tiny random-weight bases."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import GRAY, tiny_card, tiny_weights
from zoo_store.archs import arch_names, build_arch
from zoo_store.core.bundle import (
    PathArtifact,
    check_expected,
    decode_bundle,
    decode_stored,
    encode_bundle,
    make_manifest,
)
from zoo_store.core.cards import Card
from zoo_store.core.spec import CompositionSpec
from zoo_store.core.weights import digest_of
from zoo_store.datasets.tasks import TaskData
from zoo_store.methods import get_method, method_names
from zoo_store.methods.base import BuildContext
from zoo_store.methods.registry import register_method
from zoo_store.methods.reprogram import Reprogram
from zoo_store.store.store import card_for
from zoo_store.training import freeze

SMALL_ARCHS = [a for a in arch_names() if not a.startswith("tv_")]


def _base(arch: str, labels=tuple("0123456789")) -> tuple[Card, torch.nn.Module]:
    net = build_arch(arch, {"num_classes": len(labels)})
    net.load_state_dict(tiny_weights(arch, len(labels)))
    freeze(net)
    return card_for(tiny_card("b", arch, labels), net, digest_of(net), 0), net


def _task(n: int = 24, labels=("0", "1", "2")) -> TaskData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.arange(n) % len(labels)
    return TaskData(x, y, x[:6], y[:6], list(labels), x[6:12], y[6:12])


# what each method needs beyond base + task to run in a second on a tiny base ("s" is a second base)
METHOD_SPECS = {
    "resample": {"budget": {"width": 0.5}, "train": {"steps": 3, "batch_size": 8}},
    "clone": {"sources": [{"model": "s", "labels": ["1", "2"]}], "train": {"steps": 5, "batch_size": 8}},
    "reassemble": {"base": None, "models": ["b", "s"], "blocks": 2},
}


def _spec(name: str) -> CompositionSpec:
    spec = {"method": name, "base": "b", "task": {"dataset": "t"}, "train": {"epochs": 1, "batch_size": 8}}
    return CompositionSpec.model_validate({**spec, **METHOD_SPECS.get(name, {})})


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("arch", SMALL_ARCHS)
@pytest.mark.parametrize("name", method_names())
def test_build_materialize_roundtrip(name: str, arch: str) -> None:
    method = get_method(name)
    card, net = _base(arch)
    second = _base(arch)[0].model_copy(update={"id": "s"}), _base(arch)[1]
    before = digest_of(net)
    spec = _spec(name)
    needed = method.validate(spec, {"b": card, "s": second[0]})
    assert needed[0] == "b"
    bases = {"b": (card, net), "s": second}
    ctx = BuildContext(bases={k: bases[k] for k in needed}, load_task=lambda t, c: _task())
    art = method.build(spec, ctx)
    manifest = make_manifest(art)
    nets = {k: bases[k][1] for k in needed}
    check_expected(manifest, method.expected_tensors(art.config, nets))
    bundle = decode_bundle(encode_bundle(manifest, art.tensors, art.metrics))
    _same_as_stored(bundle)
    module = method.materialize(manifest.config, bundle.tensors, nets)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        out = module(x)
    assert out.shape == (5, len(art.labels))
    base_ptrs = {p.data_ptr() for n in nets.values() for p in list(n.parameters()) + list(n.buffers())}
    own = [t for t in list(module.parameters()) + list(module.buffers()) if t.data_ptr() not in base_ptrs]
    assert _bytes(own) < _bytes(net.parameters()), "a materialized path must not copy its base"
    assert digest_of(net) == before, "building or materializing must not write to the base"
    assert _bytes(art.tensors.values()) < art.metrics["dense_bytes"]


def _same_as_stored(bundle) -> None:
    """The store's fast read (views of one copy, no digest) gives what the checked decode gives."""
    stored = decode_stored(bundle.data, bundle.id)
    assert stored.manifest == bundle.manifest and stored.metrics == bundle.metrics
    assert stored.tensors.keys() == bundle.tensors.keys()
    for name, t in bundle.tensors.items():
        assert stored.tensors[name].dtype == t.dtype and torch.equal(stored.tensors[name], t), name


def test_stored_read_of_every_dtype_and_empty_tensors() -> None:
    card, _ = _base(SMALL_ARCHS[0])
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).half(),
        "c": torch.arange(7, dtype=torch.uint8),
        "d": torch.arange(-3, 3, dtype=torch.int32).view(2, 3),
        "e": torch.zeros(0, 4),
    }
    art = PathArtifact("reprogram", [{"id": card.id, "digest": card.digest}], ["x"], card.input, {}, tensors)
    bundle = decode_bundle(encode_bundle(make_manifest(art), tensors, {"m": 1}))
    _same_as_stored(bundle)
    stored = decode_stored(bundle.data, bundle.id).tensors["a"]
    stored.add_(1)  # writable, and not the stored bytes
    assert torch.equal(decode_stored(bundle.data, bundle.id).tensors["a"], tensors["a"])


def test_reprogram_shares_every_base_weight() -> None:
    card, net = _base("resnet_s")
    method = get_method("reprogram")
    art = method.build(_spec("reprogram"), BuildContext(bases={"b": (card, net)}, load_task=lambda t, c: _task()))
    module = method.materialize(art.config, art.tensors, {"b": net})
    assert {p.data_ptr() for p in net.parameters()} <= {p.data_ptr() for p in module.parameters()}


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_fresh_reprogram_reproduces_base(arch: str) -> None:
    """Identity-initialised CLR kernels and the base's head rows: exactly the base's function."""
    from zoo_store.methods.reprogram.layers import build_reprogrammed

    _, net = _base(arch)
    model = build_reprogrammed(net, net.num_classes)
    with torch.no_grad():
        model.head.load_state_dict(net.head_layer.state_dict())
        x = torch.rand(4, 1, 28, 28)
        assert torch.allclose(model(x), net(x), atol=1e-5)
    assert len(model.clr) == sum(1 for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)


def test_reprogram_training_keeps_batchnorm_frozen() -> None:
    card, net = _base("resnet_s")
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    Reprogram().build(_spec("reprogram"), BuildContext(bases={"b": (card, net)}, load_task=lambda t, c: _task()))
    assert all(torch.equal(stats[k], v) for k, v in net.state_dict().items())


def test_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method(Reprogram)


def test_input_spec_is_recorded() -> None:
    card, net = _base("vgg_s")
    art = Reprogram().build(_spec("reprogram"), BuildContext(bases={"b": (card, net)}, load_task=lambda t, c: _task()))
    assert art.input == GRAY
