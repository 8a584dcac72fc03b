"""The clone (PNC) tables: the join chosen on validation, the adapter kinds measured, and the clone
against late fusion, head-only tuning, full fine-tuning, the target alone and the source alone."""

from __future__ import annotations

import hashlib
import statistics

import torch
from torch import nn

from bench.common import SEEDS, Say, demo_store, full_ft, head_only, mean_std
from zoo_store.core.bundle import encode_bundle, make_manifest
from zoo_store.core.spec import CompositionSpec, TaskSpec
from zoo_store.core.weights import digest_of
from zoo_store.datasets.builtin import BUILTINS
from zoo_store.datasets.tasks import make_task
from zoo_store.methods.base import BuildContext
from zoo_store.methods.clone.config import plan_clone
from zoo_store.methods.clone.layers import ADAPTERS
from zoo_store.methods.clone.localize import localize
from zoo_store.methods.clone.method import Clone
from zoo_store.training import accuracy, fit, predict_logits

# (dataset, target, [(source, labels it brings)])
CASES = [
    ("mnist", "resnet-mnist-0-4", [("resnet-mnist-5-9", "56789")]),
    ("mnist", "resnet-mnist-0-4", [("vgg-mnist", "56789")]),
    ("mnist-cluttered", "resnet-mnist-0-4", [("resnet-mnist-5-9", "56789")]),
]


def clone_suite(say: Say, quick: bool) -> list[str]:
    """Adapter kinds on the first case (chosen by validation accuracy), then every case with the
    chosen kind against its baselines; mean ± std over seeds, test data read once per number."""
    store = demo_store(say, quick)
    spl, epochs = (30, 2) if quick else (200, 5)
    seeds = ", ".join(map(str, SEEDS))
    lines = [
        (
            f"Correction data: {spl} training images per label drawn by the seed, {epochs} epochs, Adam lr 1e-2 for "
            f"every head and adapter (full fine-tuning 1e-3), seeds {seeds}; mean ± std over the seeds. Every choice "
            "is made on the validation split (200 images per label, apart from training and test): the clone's "
            "source depth and insertion tap `R` (every pair trained one epoch, best validation accuracy), and the "
            "adapter kind (the table just below). Test images are read once per number: all test images of the "
            "task's labels (union), and those of the target's own labels.\n"
        ),
        "Adapter kinds (first case, MNIST): validation and test accuracy of the whole clone with each adapter.\n",
        "| adapter | validation | test (union) | test (target's labels) |",
        "|---|---:|---:|---:|",
    ]
    dataset, target_id, sources = CASES[0]
    runs = {
        k: [_clone_run(store, dataset, target_id, sources, spl, epochs, s, k, say) for s in SEEDS] for k in ADAPTERS
    }
    for k, rs in runs.items():
        lines.append(
            f"| {k} | {mean_std([r['val'] for r in rs])} | {mean_std([r['union'] for r in rs])} | "
            f"{mean_std([r['own'] for r in rs])} |"
        )
    kind = max(ADAPTERS, key=lambda k: statistics.fmean(r["val"] for r in runs[k]))
    lines += [
        f"\nChosen on validation: **{kind}**; every row below uses it.\n",
        (
            "Accuracy on all test images of the task's labels (union) and on those of the target's own labels. "
            "Late fusion: a linear head over the frozen pooled features of the target and of every source "
            "(concatenated), its rows for each base's labels started from that base's head; head-only: a new head "
            "on the frozen target; full FT: a copy of the whole target and a new head, all trained; both start "
            "the target's rows from its head, as the clone does. Target alone: the target on its own labels "
            "(its own head); source alone: each source on the labels it brings (its own head, restricted to "
            "them). Clone - LF: the per-seed difference to late fusion.\n"
        ),
        (
            "| task | target | cloned from | clone | late fusion | head-only | full FT | clone - LF | "
            "clone, target's labels | LF, target's labels | full FT, target's labels | clone - LF, target's labels "
            "| target alone | source alone |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    joins = [
        (
            "\nThe join each seed chose (source depth -> target tap `R`, kept filter fraction of the prefix) and the "
            "stored bytes (bundle / dense bytes of target + sources):\n"
        ),
        "| task | target | cloned from | join per seed | kept | stored % |",
        "|---|---|---|---|---:|---:|",
    ]
    for n, (dataset, target_id, sources) in enumerate(CASES):
        rs = (
            runs[kind]
            if n == 0
            else [_clone_run(store, dataset, target_id, sources, spl, epochs, s, kind, say) for s in SEEDS]
        )
        base = [_baselines(store, dataset, target_id, sources, spl, epochs, s, say) for s in SEEDS]

        src = " + ".join(f"{m} ({','.join(ls)})" for m, ls in sources)
        alone = "; ".join(f"{v:.4f}" for v in base[0]["source_alone"])
        lines.append(
            f"| {dataset} | {target_id} | {src} | {_col(rs, 'union')} | {_col(base, 'lf_union')} | "
            f"{_col(base, 'head_union')} | {_col(base, 'ft_union')} | {_diff(rs, base, 'union')} | {_col(rs, 'own')} | "
            f"{_col(base, 'lf_own')} | {_col(base, 'ft_own')} | {_diff(rs, base, 'own')} | "
            f"{rs[0]['target_alone']:.4f} | {alone} |"
        )
        join = "; ".join(" + ".join(r["joins"]) for r in rs)
        joins.append(f"| {dataset} | {target_id} | {src} | {join} | {_col(rs, 'kept', 2)} | {_col(rs, 'stored', 2)} |")
    return [*lines, *joins, *join_scores(runs[kind])]


def join_scores(runs: list[dict]) -> list[str]:
    """Validation accuracy of every (source depth, target tap) pair the first case's search tried,
    one epoch each: rows the source depth, columns the insertion tap, mean ± std over the seeds."""
    pairs = list(runs[0]["scores"])
    depths, taps = (
        list(dict.fromkeys(k.split("->")[0] for k in pairs)),
        list(dict.fromkeys(k.split("->")[1] for k in pairs)),
    )
    out = [
        (
            "\nWhy the join lands where it does (first case): validation accuracy of every pair after the search's one "
            "epoch (rows: source depth; columns: target tap `R`).\n"
        ),
        "| source depth | " + " | ".join(f"R = {t}" for t in taps) + " |",
        "|---|" + "---:|" * len(taps),
    ]
    for d in depths:
        out.append(f"| {d} | " + " | ".join(mean_std([r["scores"][f"{d}->{t}"] for r in runs]) for t in taps) + " |")
    return out


def _col(rows: list[dict], key: str, digits: int = 4) -> str:
    return mean_std([r[key] for r in rows], digits)


def _diff(runs: list[dict], baselines: list[dict], key: str) -> str:
    """Clone minus late fusion, seed by seed."""
    return mean_std([r[key] - b[f"lf_{key}"] for r, b in zip(runs, baselines, strict=True)])


def _task(store, dataset: str, target_id: str, labels: list[str], spl: int, seed: int):
    card = store.card(target_id)
    return make_task(
        BUILTINS[dataset].make(), TaskSpec(dataset=dataset, labels=labels, samples_per_label=spl), card.input, seed
    )


def _spec(dataset: str, target_id: str, sources, spl: int, epochs: int, seed: int):
    return CompositionSpec.model_validate(
        {
            "method": "clone",
            "base": target_id,
            "sources": [{"model": m, "labels": list(ls)} for m, ls in sources],
            "task": {"dataset": dataset, "samples_per_label": spl},
            "train": {"epochs": epochs, "seed": seed},
        }
    )


def _clone_run(
    store, dataset: str, target_id: str, sources, spl: int, epochs: int, seed: int, kind: str, say: Say
) -> dict:
    """One clone build: validation and test accuracies, its joins, kept fraction and stored share."""
    say(f"clone table: {target_id} <- {sources} on {dataset}, adapter {kind}, seed {seed}")
    spec = _spec(dataset, target_id, sources, spl, epochs, seed)
    cards = store.cards()
    plan = plan_clone(spec, cards)
    method = _memo_clone()
    method.adapter = kind
    bases = {k: (cards[k], store.load_base(cards[k])) for k in method.check(spec, cards)}
    digests = {k: digest_of(n) for k, (_, n) in bases.items()}
    data = _task(store, dataset, target_id, list(plan.labels), spl, seed)
    art = method.build(spec, BuildContext(bases=bases, load_task=lambda t, c, d=data: d))
    assert {k: digest_of(n) for k, (_, n) in bases.items()} == digests, "a base changed during the experiment"
    nets = {k: n for k, (_, n) in bases.items()}
    served = method.materialize(art.config, art.tensors, nets)
    m = art.metrics
    links = art.config["sources"]
    return {
        "val": accuracy(served, data.val_x, data.val_y, cards[target_id].input),
        "union": m["accuracy"],
        "own": m["accuracy_target_labels"],
        "target_alone": m["target_alone_accuracy"],
        "joins": [f"{s['depth']}->{s['insert']}" for s in links],
        "scores": m["source0_join_val_accuracy"],
        "kept": statistics.fmean(m[f"source{i}_kept_fraction"] for i in range(len(links))),
        "stored": 100 * len(encode_bundle(make_manifest(art), art.tensors, art.metrics)) / m["dense_bytes"],
    }


_LOCALIZED: dict[tuple, object] = {}


def _memo_clone():
    """The clone method whose localization (step 2, which does not depend on the adapter) runs once
    per source, labels, images and seed in this run: the adapter kinds are compared on the same masks."""

    def memo(source, depth, cols, images, spec, **kw):
        key = (
            digest_of(source),
            depth,
            tuple(cols),
            hashlib.sha256(images.numpy().tobytes()).hexdigest(),
            kw.get("steps"),
            kw.get("seed"),
        )
        if key not in _LOCALIZED:
            _LOCALIZED[key] = localize(source, depth, cols, images, spec, **kw)
        return _LOCALIZED[key]

    method = Clone()
    method.localize = memo
    return method


class _LateFusion(nn.Module):
    """A linear head over the frozen pooled features of the target and the sources, concatenated."""

    def __init__(self, nets: list[nn.Module], head: nn.Linear):
        super().__init__()
        self.nets, self.head = nets, head  # the frozen bases stay plain attributes: never trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([n.embed(x) for n in self.nets], 1))  # (B, sum D) -> (B, K)


def _baselines(store, dataset: str, target_id: str, sources, spl: int, epochs: int, seed: int, say: Say) -> dict:
    """Late fusion, head-only and full fine-tuning on the seed's correction data; the sources alone."""
    say(f"clone table: baselines for {target_id} <- {sources} on {dataset}, seed {seed}")
    t_card = store.card(target_id)
    labels = [*t_card.labels, *(x for _, ls in sources for x in ls)]
    data = _task(store, dataset, target_id, labels, spl, seed)
    own = torch.tensor([data.labels[int(k)] in t_card.labels for k in data.test_y])
    nets = [store.load_base(t_card), *(store.load_base(store.card(m)) for m, _ in sources)]
    cards = [t_card, *(store.card(m) for m, _ in sources)]
    brings = [list(t_card.labels), *(list(ls) for _, ls in sources)]
    head = nn.Linear(sum(n.feature_dim for n in nets), len(labels))
    with torch.no_grad():
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        start = 0
        for net, card, mine in zip(nets, cards, brings, strict=True):  # each base's rows from its own head
            for label in mine:
                i, j = labels.index(label), card.labels.index(label)
                head.weight[i, start : start + net.feature_dim] = net.head_layer.weight[j]
                head.bias[i] = net.head_layer.bias[j]
            start += net.feature_dim
    fusion = _LateFusion(nets, head)
    fit(
        fusion,
        head.parameters(),
        data.train_x,
        data.train_y,
        t_card.input,
        epochs=epochs,
        lr=1e-2,
        batch_size=64,
        seed=seed,
    )
    models = {
        "lf": fusion,
        "head": head_only(nets[0], data, t_card, epochs, init_rows=True, seed=seed)[0],
        "ft": full_ft(t_card, store, data, epochs, init_rows=True, seed=seed),
    }
    out: dict = {}
    for name, model in models.items():
        out[f"{name}_union"] = accuracy(model, data.test_x, data.test_y, t_card.input)
        out[f"{name}_own"] = accuracy(model, data.test_x[own], data.test_y[own], t_card.input)
    out["source_alone"] = []
    for net, card, mine in zip(nets[1:], cards[1:], brings[1:], strict=True):
        rows = torch.tensor([data.labels[int(k)] in mine for k in data.test_y])
        cols = [card.labels.index(x) for x in mine]
        pred = predict_logits(net, data.test_x[rows], card.input)[:, cols].argmax(1)  # (M,) index into ``mine``
        truth = torch.tensor([mine.index(data.labels[int(k)]) for k in data.test_y[rows]])
        out["source_alone"].append((pred == truth).float().mean().item())
    return out


if __name__ == "__main__":  # the first case's join scores alone: python -m bench.clone
    store = demo_store(print, False)
    dataset, target_id, sources = CASES[0]
    print(
        "\n".join(join_scores([_clone_run(store, dataset, target_id, sources, 200, 5, s, "1x1", print) for s in SEEDS]))
    )
