"""The reprogram (CLR) table: CLR against head-only tuning and full fine-tuning, over seeds."""

from __future__ import annotations

from bench.common import SEEDS, Say, demo_store, full_ft, head_only, mean_std
from zoo_store.core.bundle import encode_bundle, make_manifest
from zoo_store.core.cards import Card
from zoo_store.core.spec import CompositionSpec, TaskSpec
from zoo_store.core.weights import digest_of
from zoo_store.datasets.builtin import BUILTINS
from zoo_store.datasets.tasks import make_task
from zoo_store.methods import get_method
from zoo_store.methods.base import BuildContext
from zoo_store.training import accuracy

TASKS = ("mnist-rotated", "mnist-inverted", "mnist-parity", "digits", "mnist-cluttered")
BASES = ("resnet-mnist", "vgg-mnist", "mobilenet-mnist")


def reprogram_suite(say: Say, quick: bool) -> list[str]:
    """CLR vs head-only vs full fine-tuning on built-in tasks: held-out accuracy (mean ± std over
    seeds) and stored bytes. Nothing is chosen: every method runs the same fixed budget."""
    store = demo_store(say, quick)
    spl, epochs = (50, 2) if quick else (200, 5)
    lines = [
        (
            f"Each task: {spl} training images per label drawn by the seed (all of them where the split holds "
            f"fewer), {epochs} epochs, Adam, seeds "
            f"{', '.join(map(str, SEEDS))} (the seed draws the training images and initialises the training); "
            "accuracy on the task's test split, mean ± std over the seeds. Nothing is tuned: epochs and learning "
            "rates are fixed in advance for every method (CLR and head 1e-2, full fine-tuning 1e-3), so no "
            "validation choice is made and test data is read once per number. Head-only trains a new linear "
            "head on the frozen base; full fine-tuning trains a copy of the whole base (BatchNorm in train "
            "mode) plus the head; CLR trains the depthwise 3x3 reprogramming kernels plus the head, the base "
            "frozen. Stored % = bytes the method must keep per task / dense bytes of the base.\n"
        ),
        "| base | task | CLR acc | head-only acc | full FT acc | CLR stored % | head-only stored % | full FT stored "
        "% |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for base_id in BASES:
        card: Card = store.card(base_id)
        base = store.load_base(card)
        digest = digest_of(base)
        for task_id in TASKS:
            accs: dict[str, list[float]] = {"clr": [], "head": [], "ft": []}
            for seed in SEEDS:
                say(f"reprogram table: {base_id} on {task_id}, seed {seed}")
                spec = CompositionSpec(
                    method="reprogram",
                    base=base_id,
                    task=TaskSpec(dataset=task_id, samples_per_label=spl),
                    train={"epochs": epochs, "seed": seed, "lr": 1e-2},
                )
                data = make_task(BUILTINS[task_id].make(), spec.task, card.input, seed)
                ctx = BuildContext(bases={base_id: (card, base)}, load_task=lambda t, c, d=data: d)
                art = get_method("reprogram").build(spec, ctx)
                clr_bytes = len(encode_bundle(make_manifest(art), art.tensors, art.metrics))
                head_model, head_bytes = head_only(base, data, card, epochs, seed=seed)
                accs["clr"].append(art.metrics["accuracy"])
                accs["head"].append(accuracy(head_model, data.test_x, data.test_y, card.input))
                accs["ft"].append(
                    accuracy(full_ft(card, store, data, epochs, seed=seed), data.test_x, data.test_y, card.input)
                )
            lines.append(
                f"| {base_id} | {task_id} | {mean_std(accs['clr'])} | {mean_std(accs['head'])} | "
                f"{mean_std(accs['ft'])} | {clr_bytes / card.bytes:.2%} | {head_bytes / card.bytes:.2%} | 100% |"
            )
        assert digest_of(base) == digest, "the base changed during the experiment"
    return lines
