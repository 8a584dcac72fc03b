"""The reassemble (DeRy) table: reassembled networks against single pool models; NASWOT vs accuracy."""

from __future__ import annotations

import math

import torch

from service.bench.common import Say, demo_store, head_only
from zoo_store.paths import encode_bundle, make_manifest


def reassemble_suite(say: Say, quick: bool) -> list[str]:
    """Reassembled networks against every single pool model given head-only training under the same
    budget, on tasks the pool was not trained on; Kendall's tau between NASWOT and trained accuracy."""
    from scipy.stats import kendalltau

    from zoo_store.datasets.builtin import BUILTINS
    from zoo_store.datasets.tasks import make_task
    from zoo_store.methods.reassemble.method import search, to_artifact, train_assembly
    from zoo_store.methods.reassemble.profile import Block, assembly_cost, card_profile
    from zoo_store.methods.registry import BuildContext
    from zoo_store.methods.spec import CompositionSpec
    from zoo_store.training import accuracy
    from zoo_store.weights import digest_of

    store = demo_store(say, quick)
    spl, epochs, trained = (20, 2, 8) if quick else (100, 5, 12)
    cards = store.cards()
    pool = sorted(cards)
    bases = {k: (cards[k], store.load_base(cards[k])) for k in pool}
    digests = {k: digest_of(n) for k, (_, n) in bases.items()}
    profiles = {k: card_profile(c) for k, c in cards.items()}
    lines = [(f"Pool: the {len(pool)} demo bases ({', '.join(pool)}), K = 3 blocks, budget max_params = the largest "
              f"single pool model with its new head. Each task: {spl} training images per label, {epochs} epochs, "
              "seed 0; accuracy on the task's held-out split. Reassembled: the NASWOT-best assembly, stitches and "
              "head trained (blocks frozen). Single models: a new head on the frozen model (its pooled last "
              "feature map), same data and epochs. Params and FLOPs (one image) of the network as run, heads "
              "included. Per-unit NASWOT (an analysis, not what the method picks by): the log-determinant of "
              "the kernel divided by the number of ReLU units, which does not grow with the network's size. "
              "tau: Kendall's tau between a score and trained accuracy over the candidates trained (the "
              "NASWOT top 4, the per-unit best, and the rest spread evenly over the ranking).\n"),
             "| task | network | blocks | params | MFLOPs | accuracy |", "|---|---|---|---:|---:|---:|"]  # fmt: skip
    taus, stores = [], []
    for task in ("digits", "mnist-rotated"):
        arrays = BUILTINS[task].make()
        say(f"reassemble table: {task}")

        def load(t, c, a=arrays):
            return make_task(a, t, c.input, 0)

        probe_spec = CompositionSpec.model_validate({"method": "reassemble", "models": pool, "task": {"dataset": task, "samples_per_label": spl}})
        num_labels = len(load(probe_spec.task, cards[pool[0]]).labels)
        singles = {m: assembly_cost([Block(model=m, start=None, end=profiles[m].stages[-1].tap)], profiles, num_labels) for m in pool}
        budget = max(p for p, _ in singles.values())
        spec = CompositionSpec.model_validate({**probe_spec.model_dump(), "budget": {"max_params": budget}, "blocks": 3,
                                               "train": {"epochs": epochs, "seed": 0}})  # fmt: skip
        found = search(spec, BuildContext(bases=bases, load_task=load))
        data, card = found.data, found.card
        ranked = found.ranked
        n_img = min(len(data.train_x), 64)
        per_unit = [c.score - n_img * math.log(found.units[c.blocks]) for c in ranked]  # the unit-diagonal kernel's score
        by_unit = max(range(len(ranked)), key=lambda i: (per_unit[i], -i))
        picks = sorted({*range(min(4, len(ranked))), by_unit,
                        *(round(i) for i in torch.linspace(4, len(ranked) - 1, max(0, trained - 5)).tolist())})  # fmt: skip
        accs, val = {}, {}
        for n, i in enumerate(picks):
            say(f"reassemble table: {task}, training candidate {n + 1}/{len(picks)} (NASWOT rank {i + 1})")
            model = train_assembly(ranked[i], found.nets, card, data, found.probe, epochs, 1e-2, 64, 0, "cpu")
            accs[i] = accuracy(model, data.test_x, data.test_y, card.input)
            val[i] = accuracy(model, data.val_x, data.val_y, card.input)
            if i == 0:
                art = to_artifact(found, ranked[0], model)
                stored = len(encode_bundle(make_manifest(art), art.tensors, art.metrics)) / art.metrics["dense_bytes"]
        best = ranked[0]
        lines.append(f"| {task} | reassembled (NASWOT best) | {best.label()} | {best.params:,} | {best.flops / 1e6:.1f} | {accs[0]:.4f} |")
        c = ranked[by_unit]
        lines.append(f"| {task} | per-unit NASWOT best (rank {by_unit + 1}) | {c.label()} | {c.params:,} | {c.flops / 1e6:.1f} | {accs[by_unit]:.4f} |")
        top_trained = max(val, key=lambda i: val[i])  # chosen on validation images, reported on test
        if top_trained not in (0, by_unit):
            c = ranked[top_trained]
            lines.append(f"| {task} | best trained candidate on validation (rank {top_trained + 1}) | {c.label()} | {c.params:,} | {c.flops / 1e6:.1f} | {accs[top_trained]:.4f} |")
        for m in pool:
            head, _ = head_only(bases[m][1], data, cards[m], epochs)
            p, f = singles[m]
            lines.append(f"| {task} | {m} (head-only) | whole | {p:,} | {f / 1e6:.1f} | {accuracy(head, data.test_x, data.test_y, card.input):.4f} |")
        tau = kendalltau([ranked[i].score for i in picks], [accs[i] for i in picks])
        tau_unit = kendalltau([per_unit[i] for i in picks], [accs[i] for i in picks])
        stores.append(f"- {task}: the NASWOT-best path's bundle is {stored:.2%} of the assembled network's dense bytes")
        taus.append(f"- {task}: tau = {tau.statistic:.3f} (p = {tau.pvalue:.3f}); per-unit NASWOT: tau = "
                    f"{tau_unit.statistic:.3f} (p = {tau_unit.pvalue:.3f}); over {len(picks)} trained candidates of "
                    f"{len(ranked)} within budget ({budget:,} params); search: {found.metrics['search']}; partition: "
                    f"{'; '.join(' | '.join(s) for s in found.metrics['partition'])}")  # fmt: skip
    assert {k: digest_of(n) for k, (_, n) in bases.items()} == digests, "a base changed during the experiment"
    return [*lines, "\nNASWOT against trained accuracy:\n", *taus, "\nStored bytes:\n", *stores]
