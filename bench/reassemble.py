"""The reassemble (DeRy) tables: reassembled networks against every single pool model given the same
stitches and head training; NASWOT against trained accuracy; a pool large enough for the 0-1 program."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import torch

from bench.common import SEEDS, Say, bench_data_dir, dir_store, head_only, mean_std
from zoo_store.core.bundle import encode_bundle, make_manifest
from zoo_store.core.spec import CompositionSpec
from zoo_store.core.weights import digest_of
from zoo_store.datasets.builtin import BUILTINS
from zoo_store.datasets.tasks import make_task
from zoo_store.methods.base import BuildContext
from zoo_store.methods.reassemble.config import Budget
from zoo_store.methods.reassemble.method import (
    EXACT_MAX,
    MILP_TOP,
    NASWOT_IMAGES,
    Scorer,
    run_modules,
    search,
    to_artifact,
    train_assembly,
)
from zoo_store.methods.reassemble.profile import Block, assembly_cost, card_profile
from zoo_store.methods.reassemble.search import Candidate, feasible
from zoo_store.store.demo import DemoBase, ensure_bases
from zoo_store.training import accuracy

# The bench's pool: four families, each with a tap after every block (6-8 spatial taps), trained on
# MNIST with the demo zoo's recipe (under ZOO_DATA_DIR, once; `zoo serve` never builds them)
POOL = (
    DemoBase(
        "resnet-deep-mnist",
        "resnet_s",
        "mnist",
        "small ResNet, 2 blocks per stage, a tap per block",
        config={"blocks": [2, 2, 2], "block_taps": True},
    ),
    DemoBase("vgg-deep-mnist", "vgg_s", "mnist", "VGG-style net, a tap per conv", config={"block_taps": True}),
    DemoBase(
        "mobilenet-deep-mnist",
        "mobilenet_s",
        "mnist",
        "MobileNetV2-style net, a tap per block",
        config={"block_taps": True},
    ),
    DemoBase(
        "convnext-mnist", "convnext_s", "mnist", "ConvNeXt-style net, a tap per block", config={"block_taps": True}
    ),
)
TASKS = ("digits", "mnist-cluttered")
K_EXACT, K_MILP = 3, 5  # 4 models: 4^3 = 64 assemblies (enumerated), 4^5 = 1,024 (beyond EXACT_MAX: the 0-1 program)
SAMPLE = 32  # feasible K_MILP assemblies drawn at random and scored by true NASWOT, to check the program's pick


@dataclass
class Run:
    """One trained network of a table row, on one seed."""

    label: str
    params: int
    val: float
    test: float


def reassemble_suite(say: Say, quick: bool) -> list[str]:
    store = dir_store(bench_data_dir())
    ensure_bases(store, POOL, 2000 if quick else 12000, say, what="reassemble pool")
    cards = {b.id: store.cards()[b.id] for b in POOL}
    stale = [b.id for b in POOL if cards[b.id].arch_config != b.config]
    assert not stale, f"{stale} in {bench_data_dir()} were registered with another config: remove them to retrain"
    bases = {k: (c, store.load_base(c)) for k, c in cards.items()}
    digests = {k: digest_of(n) for k, (_, n) in bases.items()}
    spl, epochs, trained = (20, 2, 4) if quick else (100, 5, 8)
    seeds = SEEDS[:2] if quick else SEEDS
    taps = ", ".join(f"{k} ({len(n.spatial_taps())})" for k, (_, n) in bases.items())
    accs = ", ".join(f"{c.metrics['accuracy']:.4f}" for c in cards.values())
    samples = ", ".join(sorted({f"{int(c.metrics['train_samples']):,}" for c in cards.values()}))
    lines = [
        (
            f"Pool: {taps} spatial taps, each trained by this bench on MNIST as the demo zoo's bases "
            f"({samples} images, 2 epochs; held-out accuracy {accs}). "
            f"Each task: {spl} training images per label, {epochs} epochs of Adam (lr 1e-2) for every network "
            f"of the table; seeds {', '.join(map(str, seeds))} (the seed draws the training images, the probe, the "
            "partition's restarts and the initialisation); cells are mean ± std over the seeds, test accuracy. "
            "Choices are made on the validation split: which trained candidate, which single model is best. "
            "Budget: max_params = the largest single pool model with its new head.\n\n"
            "Rows. *Reassembled (NASWOT best)*: what the method builds, chosen without labels. *Best trained "
            f"candidate on validation*: of the {trained} candidates trained per seed (the NASWOT top 4 and the rest "
            "spread evenly over the ranking). *<model> + stitches*: the single model cut at its own partition "
            "cuts, a stitch (BatchNorm + 1x1 conv, least-squares start) at every cut and a new head, trained "
            "exactly as the reassembled network: the same kind of trainable parts, the budget plus its stitches "
            "(the largest model with them is over it, which can only favour the controls). *<model> head-only*: "
            "a new head on the frozen model. *Difference*: per seed, reassembled minus the single model with "
            "stitches that is best on validation.\n"
        ),
        "| task | network | params (seed 0) | accuracy |",
        "|---|---|---:|---:|",
    ]
    notes = []
    for task in TASKS:
        arrays = BUILTINS[task].make()
        runs: dict[str, list[Run]] = {}
        picks: list[str] = []
        taus: list[float] = []
        for seed in seeds:
            say(f"reassemble table: {task}, seed {seed}")
            found = _search(bases, arrays, task, K_EXACT, spl, epochs, seed)
            rows, tau, stored = _exact_rows(say, found, bases, cards, epochs, trained, seed)
            for k, v in rows.items():
                runs.setdefault(k, []).append(v)
            picks.append(
                f"seed {seed}: {rows['reassembled (NASWOT best)'].label}; on validation: "
                f"{rows['best trained candidate on validation'].label}"
            )
            taus.append(tau)
        lines += _table_rows(task, runs)
        notes.append(
            f"- {task}: Kendall's tau between NASWOT and trained test accuracy over each seed's {trained} "
            f"trained candidates: {', '.join(f'{t:.2f}' for t in taus)}; search (seed {seeds[-1]}): "
            f"{found.metrics['search']} over {found.metrics['candidates_feasible']} assemblies within budget; "
            f"the path's bundle is {stored:.2%} of the assembled network's dense bytes (seed {seeds[-1]}). "
            f"Picks: {'; '.join(picks)}. Partition (seed {seeds[-1]}): "
            f"{'; '.join(' | '.join(s) for s in found.metrics['partition'])}"
        )
    milp_lines = _milp_table(say, bases, spl, epochs, seeds)
    assert {k: digest_of(n) for k, (_, n) in bases.items()} == digests, "a base changed during the experiment"
    return [*lines, "\nPer task:\n", *notes, "", *milp_lines]


def _budget(bases, num_labels: int) -> int:
    """max_params of the tables: the largest single pool model with its new head."""
    profiles = {m: card_profile(c) for m, (c, _) in bases.items()}
    return max(
        assembly_cost([Block(model=m, start=None, end=p.stages[-1].tap)], profiles, num_labels)[0]
        for m, p in profiles.items()
    )


def _search(bases, arrays, task: str, k: int, spl: int, epochs: int, seed: int):
    spec = CompositionSpec.model_validate(
        {
            "method": "reassemble",
            "models": sorted(bases),
            "blocks": k,
            "task": {"dataset": task, "samples_per_label": spl},
            "budget": {"max_params": _budget(bases, len(arrays.labels))},
            "train": {"epochs": epochs, "seed": seed},
        }
    )
    return search(spec, BuildContext(bases=bases, load_task=lambda t, c: make_task(arrays, t, c.input, seed)))


def _train(found, cand, epochs: int, seed: int, stitch_all: bool = False):
    return train_assembly(
        cand, found.nets, found.card, found.data, found.probe, epochs, 1e-2, 64, seed, "cpu", stitch_all=stitch_all
    )


def _run(found, model, label: str) -> Run:
    d, spec = found.data, found.card.input
    params = sum(p.numel() for p in {id(p): p for m in run_modules(model) for p in m.parameters()}.values())
    return Run(label, params, accuracy(model, d.val_x, d.val_y, spec), accuracy(model, d.test_x, d.test_y, spec))


def _single(found, m: str):
    """Model ``m`` cut at its own partition cuts: the candidate of all its blocks."""
    blocks = tuple(b for s in found.sets for b in s if b.model == m)
    p, f = assembly_cost(list(blocks), {m: card_profile(found.cards[m])}, len(found.data.labels))
    return Candidate(blocks, p, f)


def _exact_rows(
    say: Say, found, bases, cards, epochs: int, trained: int, seed: int
) -> tuple[dict[str, Run], float, float]:
    """One seed of an exact-search table: trained candidates, the single-model controls; tau; stored fraction."""
    from scipy.stats import kendalltau

    ranked = found.ranked
    picks = sorted(
        {
            *range(min(4, len(ranked))),
            *(round(i) for i in torch.linspace(4, len(ranked) - 1, max(0, trained - 4)).tolist()),
        }
    )
    cands: dict[int, Run] = {}
    for n, i in enumerate(picks):
        say(f"  candidate {n + 1}/{len(picks)} (NASWOT rank {i + 1})")
        model = _train(found, ranked[i], epochs, seed)
        cands[i] = _run(found, model, ranked[i].label())
        if i == 0:
            art = to_artifact(found, ranked[0], model)
            stored = len(encode_bundle(make_manifest(art), art.tensors, art.metrics)) / art.metrics["dense_bytes"]
    on_val = max(cands, key=lambda i: (cands[i].val, -i))
    rows = {"reassembled (NASWOT best)": cands[0], "best trained candidate on validation": cands[on_val]}
    singles = {}
    for m in sorted(bases):
        say(f"  {m}: stitches at its cuts, then head-only")
        singles[m] = _run(found, _train(found, _single(found, m), epochs, seed, stitch_all=True), m)
        rows[f"{m} + stitches"] = singles[m]
        head, _ = head_only(bases[m][1], found.data, cards[m], epochs, seed=seed)
        d = found.data
        rows[f"{m} head-only"] = Run(
            m, _single(found, m).params, float("nan"), accuracy(head, d.test_x, d.test_y, found.card.input)
        )
    best = max(singles.values(), key=lambda r: r.val)
    rows["difference: reassembled - best single + stitches"] = Run(
        best.label, 0, float("nan"), cands[0].test - best.test
    )
    rows["difference: best trained candidate - best single + stitches"] = Run(
        best.label, 0, float("nan"), cands[on_val].test - best.test
    )
    tau = kendalltau([ranked[i].score for i in picks], [cands[i].test for i in picks]).statistic
    return rows, float(tau), stored


def _table_rows(task: str, runs: dict[str, list[Run]]) -> list[str]:
    out = []
    for name, rs in runs.items():
        params = f"{rs[0].params:,}" if rs[0].params else ""
        out.append(f"| {task} | {name} | {params} | {mean_std([r.test for r in rs])} |")
    return out


def _milp_table(say: Say, bases, spl: int, epochs: int, seeds: tuple[int, ...]) -> list[str]:
    """K_MILP blocks: more assemblies than the exact search scores, so the 0-1 program picks; its pick
    checked against SAMPLE feasible assemblies drawn at random (true NASWOT, and a few trained)."""
    task = TASKS[-1]
    arrays = BUILTINS[task].make()
    runs: dict[str, list[Run]] = {}
    checks = []
    picked = f"reassembled (0-1 program, NASWOT best of its {MILP_TOP})"
    for seed in seeds:
        say(f"reassemble 0-1 program table: {task}, seed {seed}")
        found = _search(bases, arrays, task, K_MILP, spl, epochs, seed)
        assert found.metrics["search"] == "milp", found.metrics["search"]
        profiles = {m: card_profile(c) for m, c in found.cards.items()}
        budget = Budget(max_params=_budget(bases, len(found.data.labels)))
        all_cands, _ = feasible(found.sets, profiles, len(found.data.labels), budget)
        sample = random.Random(seed).sample(all_cands, min(SAMPLE, len(all_cands)))
        scorer = Scorer(found.nets, found.card, found.probe, found.probe[:NASWOT_IMAGES], len(found.data.labels))
        scores = sorted((scorer(c), i) for i, c in enumerate(sample))
        pick = found.ranked[0]
        below = sum(s < pick.score for s, _ in scores) / len(scores)
        checks.append(
            f"seed {seed}: {len(all_cands):,} assemblies within budget; the program's pick scores NASWOT "
            f"{pick.score:.1f}, above {below:.0%} of the {len(sample)} drawn (their best {scores[-1][0]:.1f}, "
            f"median {statistics.median(s for s, _ in scores):.1f}); pick: {pick.label()}"
        )
        rows = {picked: _run(found, _train(found, pick, epochs, seed), pick.label())}
        best_drawn = sample[scores[-1][1]]
        rows["NASWOT best of the drawn assemblies"] = _run(
            found, _train(found, best_drawn, epochs, seed), best_drawn.label()
        )
        drawn = [
            _run(found, _train(found, sample[i], epochs, seed), sample[i].label())
            for _, i in (scores[0], scores[len(scores) // 2], scores[-2])
        ]
        rows["3 drawn assemblies (low, middle, high NASWOT), mean"] = Run(
            "", 0, statistics.fmean(r.val for r in drawn), statistics.fmean(r.test for r in drawn)
        )
        singles = {
            m: _run(found, _train(found, _single(found, m), epochs, seed, stitch_all=True), m) for m in sorted(bases)
        }
        best = max(singles.values(), key=lambda r: r.val)
        rows["best single + stitches on validation"] = best
        rows["difference: reassembled - best single + stitches"] = Run(
            "", 0, float("nan"), rows[picked].test - best.test
        )
        for k, v in rows.items():
            runs.setdefault(k, []).append(v)
        say(f"  {checks[-1]}")
    return [
        (
            f"0-1 program table: {task}, K = {K_MILP} blocks, the same pool, budget, data and training; "
            f"the exact search scores at most {EXACT_MAX} assemblies, so the 0-1 program proposes {MILP_TOP}, "
            "re-ranked by true NASWOT.\n"
        ),
        "| task | network | params (seed 0) | accuracy |",
        "|---|---|---:|---:|",
        *_table_rows(task, runs),
        "\nThe program's pick against assemblies drawn at random:\n",
        *(f"- {c}" for c in checks),
    ]
