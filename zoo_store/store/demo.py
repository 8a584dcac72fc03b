"""The demo zoo, trained here from packaged data with fixed seeds."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from zoo_store.archs import build_arch
from zoo_store.core.cards import Card, CardIn, InputSpec
from zoo_store.core.spec import TaskSpec
from zoo_store.datasets.builtin import BUILTINS
from zoo_store.datasets.tasks import make_task
from zoo_store.store.store import Store
from zoo_store.training import accuracy, fit

MNIST_INPUT = InputSpec(channels=1, size=28, mean=(0.1307,), std=(0.3081,))


@dataclass(frozen=True)
class DemoBase:
    id: str
    arch: str
    dataset: str
    description: str
    epochs: int = 2
    config: dict[str, Any] = field(default_factory=dict)  # the arch_config (num_classes aside)
    per_label: int | None = None  # training images per label (None: the zoo's ``samples`` spread over the labels)


DEMO_BASES = (
    DemoBase("resnet-mnist", "resnet_s", "mnist", "small ResNet on MNIST 0-9"),
    DemoBase("vgg-mnist", "vgg_s", "mnist", "VGG-style net on MNIST 0-9"),
    DemoBase("mobilenet-mnist", "mobilenet_s", "mnist", "MobileNetV2-style net on MNIST 0-9"),
    DemoBase("resnet-mnist-0-4", "resnet_s", "mnist-0-4", "small ResNet on MNIST digits 0-4 only"),
    DemoBase("resnet-mnist-5-9", "resnet_s", "mnist-5-9", "small ResNet on MNIST digits 5-9 only"),
)


def train_base(
    b: DemoBase, samples: int, seed: int = 0, what: str = "demo zoo"
) -> tuple[CardIn, dict[str, torch.Tensor]]:
    """``b`` trained with the demo recipe; ``what`` (the set it belongs to) goes into its description."""
    arrays = BUILTINS[b.dataset].make()
    per_label = b.per_label or max(1, samples // len(arrays.labels))
    data = make_task(arrays, TaskSpec(dataset=b.dataset, samples_per_label=per_label), MNIST_INPUT, seed)
    torch.manual_seed(seed)
    net = build_arch(b.arch, {**b.config, "num_classes": len(data.labels)})
    fit(
        net,
        net.parameters(),
        data.train_x,
        data.train_y,
        MNIST_INPUT,
        epochs=b.epochs,
        lr=3e-3,
        batch_size=128,
        seed=seed,
    )
    net.eval()
    acc = accuracy(net, data.test_x, data.test_y, MNIST_INPUT)
    card = CardIn(
        id=b.id,
        arch=b.arch,
        arch_config=b.config,
        labels=tuple(data.labels),
        input=MNIST_INPUT,
        metrics={"accuracy": round(acc, 4), "train_samples": len(data.train_x), "test_samples": len(data.test_x)},
        description=f"{b.description} ({what}, seed {seed}, test split: {b.dataset})",
    )
    return card, net.state_dict()


def ensure_demo_zoo(store: Store, samples: int, say: Callable[[str], None] = print) -> None:
    """Train and register every missing demo base; a no-op once they exist."""
    ensure_bases(store, DEMO_BASES, samples, say)


def ensure_bases(
    store: Store, bases: tuple[DemoBase, ...], samples: int, say: Callable[[str], None] = print, what: str = "demo zoo"
) -> list[Card]:
    """Train and register every one of ``bases`` the store lacks (the demo zoo's recipe); ``what``
    names them in the progress lines and in their descriptions. Returns the cards it registered."""
    have = store.cards()
    todo = [b for b in bases if b.id not in have]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    made = []
    for i, b in enumerate(todo, 1):
        size = f"{b.per_label} per label" if b.per_label else f"{samples} samples"
        say(f"{what}: training {b.id} ({b.arch} on {b.dataset}, {size}, {b.epochs} epochs) [{i}/{len(todo)}]")
        start = time.perf_counter()
        card_in, state = train_base(b, samples, what=what)
        card, _ = store.add_base(card_in, state)
        made.append(card)
        took = time.perf_counter() - start
        say(f"{what}: {b.id} ready in {took:.0f} s, held-out accuracy {card.metrics['accuracy']:.4f}")
    return made
