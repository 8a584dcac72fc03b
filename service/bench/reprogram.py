"""The reprogram (CLR) table: CLR against head-only tuning and full fine-tuning."""

from __future__ import annotations

from service.bench.common import Say, demo_store, full_ft, head_only
from zoo_store.cards import Card
from zoo_store.paths import encode_bundle, make_manifest


def reprogram_suite(say: Say, quick: bool) -> list[str]:
    """CLR vs head-only vs full fine-tuning on built-in tasks: held-out accuracy and stored bytes."""
    from zoo_store.datasets.builtin import BUILTINS
    from zoo_store.datasets.tasks import make_task
    from zoo_store.methods.registry import BuildContext, get_method
    from zoo_store.methods.spec import CompositionSpec, TaskSpec
    from zoo_store.training import accuracy
    from zoo_store.weights import digest_of

    store = demo_store(say, quick)
    spl = 50 if quick else 200
    epochs = 2 if quick else 5
    tasks = ["mnist-rotated", "mnist-inverted", "mnist-parity", "digits"]
    bases = ["resnet-mnist", "vgg-mnist", "mobilenet-mnist"]
    lines = [(f"Each task: {spl} training images per label, {epochs} epochs, Adam, seed 0; accuracy on the task's "
             "held-out test split. Head-only trains a new linear head on the frozen base; full fine-tuning trains a "
             "copy of the whole base (BatchNorm in train mode) plus the head; CLR trains the depthwise 3x3 "
             "reprogramming kernels plus the head, the base frozen. Stored % = bytes the method must keep per task / "
             "dense bytes of the base.\n"),
             "| base | task | CLR acc | head-only acc | full FT acc | CLR stored % | head-only stored % | full FT stored % |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for base_id in bases:
        card: Card = store.card(base_id)
        base = store.load_base(card)
        digest = digest_of(base)
        for task_id in tasks:
            say(f"reprogram table: {base_id} on {task_id}")
            spec = CompositionSpec(method="reprogram", base=base_id,
                                   task=TaskSpec(dataset=task_id, samples_per_label=spl),
                                   train={"epochs": epochs, "seed": 0, "lr": 1e-2})  # fmt: skip
            data = make_task(BUILTINS[task_id].make(), spec.task, card.input, 0)
            ctx = BuildContext(bases={base_id: (card, base)}, load_task=lambda t, c, d=data: d)
            art = get_method("reprogram").build(spec, ctx)
            clr_bytes = len(encode_bundle(make_manifest(art), art.tensors, art.metrics))
            dense = card.bytes
            head_model, head_bytes = head_only(base, data, card, epochs)
            head_acc = accuracy(head_model, data.test_x, data.test_y, card.input)
            ft_acc = accuracy(full_ft(card, store, data, epochs), data.test_x, data.test_y, card.input)
            lines.append(f"| {base_id} | {task_id} | {art.metrics['accuracy']:.4f} | {head_acc:.4f} | {ft_acc:.4f} | "
                         f"{clr_bytes / dense:.2%} | {head_bytes / dense:.2%} | 100% |")  # fmt: skip
        assert digest_of(base) == digest, "the base changed during the experiment"
    return lines
