"""The clone (PNC) table: clone paths against head-only tuning and full fine-tuning of the target."""

from __future__ import annotations

import torch

from service.bench.common import Say, demo_store, full_ft, head_only
from zoo_store.paths import encode_bundle, make_manifest


def clone_suite(say: Say, quick: bool) -> list[str]:
    """Clone paths against head-only tuning and full fine-tuning of the target on the same correction
    data, and the target alone on its own labels; stored bytes against target + sources."""
    from zoo_store.datasets.builtin import BUILTINS
    from zoo_store.datasets.tasks import make_task
    from zoo_store.methods.clone.config import plan_clone
    from zoo_store.methods.registry import BuildContext, get_method
    from zoo_store.methods.spec import CompositionSpec, TaskSpec
    from zoo_store.training import accuracy
    from zoo_store.weights import digest_of

    store = demo_store(say, quick)
    spl, epochs = (30, 2) if quick else (200, 5)
    cases = [
        ("resnet-mnist-0-4", [("resnet-mnist-5-9", "56789")]),
        ("resnet-mnist-5-9", [("resnet-mnist-0-4", "01234")]),
        ("resnet-mnist-0-4", [("vgg-mnist", "56789")]),
        ("resnet-mnist-0-4", [("resnet-mnist-5-9", "567"), ("vgg-mnist", "89")]),
    ]
    lines = [(f"Task: MNIST digits 0-9, correction data {spl} training images per label, {epochs} epochs, seed 0; "
             "accuracy on the 10,000 held-out test images (union), and on those of the target's own labels. "
             "Head-only: a new head on the frozen target; full FT: a copy of the whole target and a new head, "
             "all trained; both heads start from the target's rows for its labels, as the clone's does. "
             "Target alone: the target on its own labels (its own 5-way head). Stored: the clone bundle / "
             "dense bytes of target + sources.\n"),
             ("| target | cloned from | clone | head-only | full FT | clone, target's labels | head-only, target's labels "
             "| full FT, target's labels | target alone | stored |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    method = get_method("clone")
    mnist = BUILTINS["mnist"].make()
    for target_id, sources in cases:
        say(f"clone table: {target_id} <- {sources}")
        spec = CompositionSpec.model_validate({
            "method": "clone", "base": target_id, "sources": [{"model": m, "labels": list(ls)} for m, ls in sources],
            "task": {"dataset": "mnist", "samples_per_label": spl}, "train": {"epochs": epochs, "seed": 0}})  # fmt: skip
        cards = store.cards()
        plan = plan_clone(spec, cards)
        bases = {k: (cards[k], store.load_base(cards[k])) for k in method.check(spec, cards)}
        t_card, target = bases[target_id]
        digests = {k: digest_of(n) for k, (_, n) in bases.items()}
        data = make_task(mnist, TaskSpec(dataset="mnist", labels=list(plan.labels), samples_per_label=spl), t_card.input, 0)
        art = method.build(spec, BuildContext(bases=bases, load_task=lambda t, c, d=data: d))
        stored = len(encode_bundle(make_manifest(art), art.tensors, art.metrics)) / art.metrics["dense_bytes"]
        own = torch.tensor([data.labels[int(k)] in t_card.labels for k in data.test_y])
        head, _ = head_only(target, data, t_card, epochs, init_rows=True)
        full = full_ft(t_card, store, data, epochs, init_rows=True)
        accs = {name: (accuracy(m, data.test_x, data.test_y, t_card.input),
                       accuracy(m, data.test_x[own], data.test_y[own], t_card.input)) for name, m in (("head", head), ("ft", full))}  # fmt: skip
        m = art.metrics
        src = " + ".join(f"{mid} ({','.join(ls)})" for mid, ls in sources)
        lines.append(f"| {target_id} | {src} | {m['accuracy']:.4f} | {accs['head'][0]:.4f} | {accs['ft'][0]:.4f} | "
                     f"{m['accuracy_target_labels']:.4f} | {accs['head'][1]:.4f} | {accs['ft'][1]:.4f} | "
                     f"{m['target_alone_accuracy']:.4f} | {stored:.2%} |")  # fmt: skip
        assert {k: digest_of(n) for k, (_, n) in bases.items()} == digests, "a base changed during the experiment"
    return lines
