"""The reassemble (DeRy) tables: reassembled networks against single zoo models of equal or larger
size, on the complementary zoo (four families, two widths, each pretrained on its own domain).

Two phases, each one job per (task, seed) in ``WORKERS`` one-thread processes:
1. the proxies: ``TAU_CANDIDATES`` assemblies drawn at random within the largest budget, freeze-tuned,
   ranked by every proxy; Kendall's tau against validation accuracy; the best mean tau picks the proxy;
2. the tables: per budget, the reassembled network (the chosen proxy's best), the best single pool
   model within the budget and the best single model resampled to the budget, each with stitches
   at its partition cuts, each freeze-tuned and fully tuned.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import multiprocessing
import random
import statistics
from dataclasses import dataclass, field

import torch
from scipy.stats import kendalltau
from torch import nn

from bench.common import Say, bench_data_dir, dir_store, macs, mean_std, paired_interval, t_interval, time_ratio
from zoo_store.archs.surgery import tensor_bytes
from zoo_store.core.cards import Card
from zoo_store.core.errors import InvalidInput
from zoo_store.core.keystore import MemoryKeyStore
from zoo_store.core.spec import CompositionSpec
from zoo_store.core.weights import digest_of
from zoo_store.datasets.builtin import BUILTINS
from zoo_store.datasets.tasks import make_task
from zoo_store.methods.base import BuildContext
from zoo_store.methods.reassemble.config import Budget
from zoo_store.methods.reassemble.layers import Assembled, build_assembled, fit_stitches, shapes_of, stitch_params
from zoo_store.methods.reassemble.method import Scorer, Search, assembled_bytes, path_tensors, run_modules, search
from zoo_store.methods.reassemble.profile import Block, card_profile
from zoo_store.methods.reassemble.proxies import PROXIES
from zoo_store.methods.reassemble.search import Candidate, feasible
from zoo_store.methods.resample.method import Resample
from zoo_store.store.zoos import ZOOS, build_zoo
from zoo_store.training import accuracy, fit, normalize

SEEDS = (0, 1, 2, 3, 4)
WORKERS = 2  # processes, one thread each
# the tasks: two that need more than one domain of the zoo, and a control one domain covers
TASKS = {
    "mnist-letters": "digits and letters (the digit and the letter nets' domains)",
    "shapes-mnist": "shapes and digits (the shape and the digit nets' domains)",
    "letters": "letters only (the control: the letter nets' own domain)",
}
BUDGETS = (0.25, 0.5, 1.0)  # fractions of the largest pool model's parameters with its new head
BLOCKS = 3
TUNINGS = ("freeze", "full")
LR, BLOCK_LR = 1e-2, 1e-3  # stitches and head; and, fully tuned, every block at the lower rate
# (training images per label, epochs, assemblies per (task, seed) trained to rank the proxies): full, --quick
SIZES = {False: (60, 5, 8), True: (20, 2, 4)}
ROWS = ("reassembled", "best single within budget", "single resampled to budget")


@dataclass
class Run:
    """One trained network: what it is, its size and cost, its accuracies."""

    label: str
    key: str  # which network of the seed's latency measurements it is
    params: int
    flops: int
    stored: int
    val: float
    test: float


@dataclass
class SeedRuns:
    """Every row of one (task, seed): runs by (budget, row, tuning)."""

    runs: dict[tuple[float, str, str], Run] = field(default_factory=dict)
    partition: list[str] = field(default_factory=list)
    latency: dict[str, tuple[float, float]] = field(default_factory=dict)


def reassemble_suite(say: Say, quick: bool) -> list[str]:
    store = dir_store(bench_data_dir())
    build_zoo(store, "complementary", 0, say)
    seeds = SEEDS[:2] if quick else SEEDS
    drawn = SIZES[quick][2]
    tasks = list(TASKS)[:1] if quick else list(TASKS)
    jobs = [(task, seed, quick) for task in tasks for seed in seeds]
    with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
        taus = {j[:2]: t for j, t in zip(jobs, pool.imap(_tau_job, jobs, chunksize=1), strict=True)}
        proxy = max(PROXIES, key=lambda p: _mean_tau(taus.values(), p))
        say(f"reassemble bench: the proxy that ranks best on validation is {proxy}")
        done = pool.imap(_table_job, [(*j, proxy) for j in jobs], chunksize=1)
        tables = {j[:2]: t for j, t in zip(jobs, done, strict=True)}
    _keep(taus, tables)
    lines = [_preamble(seeds, quick), *_tau_table(taus, tasks, seeds, proxy, drawn)]
    for task in tasks:
        lines += _tables(task, [tables[task, s] for s in seeds])
    return lines


def _mean_tau(taus, proxy: str) -> float:
    """The mean of a proxy's taus; an undefined tau (constant scores or accuracies) counts as 0."""
    return statistics.fmean(0.0 if math.isnan(t[proxy]) else t[proxy] for t in taus)


def _keep(taus: dict, tables: dict) -> None:
    """The raw runs as JSON beside the bench's data (what the tables are made of)."""
    raw = {"taus": {f"{t}/{s}": v for (t, s), v in taus.items()}}
    raw["tables"] = {
        f"{t}/{s}": dataclasses.asdict(r)
        | {"runs": {"/".join(map(str, k)): dataclasses.asdict(v) for k, v in r.runs.items()}}
        for (t, s), r in tables.items()
    }
    (bench_data_dir() / "reassemble-runs.json").write_text(json.dumps(raw, indent=1))


# -- one (task, seed) --------------------------------------------------------------------------------------------------


def _bases() -> dict[str, tuple[Card, nn.Module]]:
    store = dir_store(bench_data_dir())
    cards = store.cards()
    return {m: (cards[m], store.load_base(cards[m])) for m in sorted(b.id for b in ZOOS["complementary"].bases)}


def _setup(
    task: str, seed: int, quick: bool, max_params: int | None, bases: dict, cache: MemoryKeyStore, proxy: str = ""
) -> Search:
    """The method's own steps 1-2 for ``task`` within ``max_params`` (None: any size), on ``bases``;
    ``cache`` keeps the CKA matrices for the next search of the same task and seed."""
    arrays = BUILTINS[task].make()
    spec = CompositionSpec.model_validate(
        {
            "method": "reassemble",
            "models": sorted(bases),
            "blocks": BLOCKS,
            "task": {"dataset": task, "samples_per_label": SIZES[quick][0]},
            "budget": {"max_params": max_params} if max_params else {},
            "train": {"epochs": SIZES[quick][1], "seed": seed},
            "options": {"proxy": proxy} if proxy else {},
        }
    )
    return search(
        spec, BuildContext(bases=bases, load_task=lambda t, c: make_task(arrays, t, c.input, seed), cache=cache)
    )


def largest(found: Search) -> int:
    """The 100% budget: parameters of the largest pool model as the tables train it (cut at its
    partition cuts, a stitch at every cut, a new head over the task's labels)."""
    return max(_params(_assembled(found, _single(found, m), found.nets, single=True)) for m in found.nets)


def _tau_job(job: tuple[str, int, bool]) -> dict[str, float]:
    """Kendall's tau of every proxy against validation accuracy over assemblies drawn at random."""
    torch.set_num_threads(1)
    task, seed, quick = job
    print(f"reassemble bench, proxies: {task}, seed {seed}", flush=True)
    found = _setup(task, seed, quick, None, _bases(), MemoryKeyStore())
    profiles = {m: card_profile(c) for m, c in found.cards.items()}
    cands, _ = feasible(found.sets, profiles, len(found.data.labels), Budget(max_params=largest(found)))
    drawn = random.Random(seed).sample(cands, SIZES[quick][2])
    scorer = Scorer(found.nets, found.card, found.probe, found.probes, len(found.data.labels))
    scores = {p: [scorer(c, PROXIES[p]) for c in drawn] for p in PROXIES}
    vals = [_train(found, c, c.label(), "freeze", seed, quick, single=False, test=False)[0].val for c in drawn]
    return {p: float(kendalltau(s, vals).statistic) for p, s in scores.items()}


def _table_job(job: tuple[str, int, bool, str]) -> SeedRuns:
    torch.set_num_threads(1)
    task, seed, quick, proxy = job
    print(f"reassemble bench, tables: {task}, seed {seed}", flush=True)
    out = SeedRuns()
    bases, cache = _bases(), MemoryKeyStore()  # one copy of the bases and the CKA matrices for every search
    found = _setup(task, seed, quick, None, bases, cache, proxy)
    digests = {m: digest_of(n) for m, n in found.nets.items()}
    out.partition = [" | ".join(b.label() for b in s) for s in found.sets]
    limit = largest(found)
    singles: dict[str, dict[str, Run]] = {}
    models: dict[str, nn.Module] = {}  # the freeze-tuned networks, for the latency of seed 0
    for m in sorted(found.nets):
        for t in TUNINGS:
            run, model = _train(found, _single(found, m), m, t, seed, quick, single=True)
            singles.setdefault(m, {})[t] = run
            if t == "freeze":
                models[m] = model
    for budget in BUDGETS:
        cap = round(budget * limit)
        at = _setup(task, seed, quick, cap, bases, cache, proxy)
        for t in TUNINGS:
            key = f"{budget}, {ROWS[0]}"
            run, model = _train(at, at.ranked[0], key, t, seed, quick, single=False)
            out.runs[budget, ROWS[0], t] = run
            if t == "freeze":
                models[key] = model
            within = {m: r[t] for m, r in singles.items() if r[t].params <= cap}
            if within:
                out.runs[budget, ROWS[1], t] = max(within.values(), key=lambda r: r.val)
        larger = [m for m in singles if singles[m]["freeze"].params > cap]
        if larger:  # the single model best on validation among those over the budget, resampled to it
            m = max(larger, key=lambda m: singles[m]["freeze"].val)
            small = _resampled(found, m, cap)
            for t in TUNINGS if small else ():
                key = f"{budget}, {ROWS[2]}"
                run, model = _train(found, _single(found, m, small), key, t, seed, quick, single=True, extra=small)
                out.runs[budget, ROWS[2], t] = run
                if t == "freeze":
                    models[key] = model
    if seed == SEEDS[0]:
        out.latency = _latency(models, found, max(singles, key=lambda m: singles[m]["freeze"].params))
    assert {m: digest_of(n) for m, n in found.nets.items()} == digests, "a base changed during the experiment"
    return out


def _latency(models: dict[str, nn.Module], found: Search, largest_model: str) -> dict[str, tuple[float, float]]:
    """Each network's time over the largest pool model's (with stitches), one image and a batch of
    64, measured alternately in this process."""
    spec, x = found.card.input, found.data.test_x
    one, batch = normalize(x[:1], spec), normalize(x[:64], spec)
    ref = models[largest_model]
    out = {}
    with torch.no_grad():
        for k, m in models.items():
            out[k] = tuple(time_ratio(lambda m=m, x=x: m(x), lambda x=x: ref(x)) for x in (one, batch))
    return out  # type: ignore[return-value]


def _single(found: Search, m: str, small: tuple[str, nn.Module, int] | None = None) -> Candidate:
    """Model ``m`` (or its resampled copy ``small``) cut at its own partition cuts."""
    name = small[0] if small else m
    blocks = tuple(Block(model=name, start=b.start, end=b.end) for s in found.sets for b in s if b.model == m)
    return Candidate(blocks, 0, 0)


def _resampled(found: Search, m: str, limit: int) -> tuple[str, nn.Module, int] | None:
    """``m`` resampled by this project's resample method (no tuning) to the most parameters whose
    network, with stitches at its cuts and a new head, fits ``limit``; its path's tensor bytes."""
    card, net = found.cards[m], found.nets[m]
    name, best, target, tried = f"{m}, resampled", None, limit, set()
    while target not in tried and len(tried) < 8:  # the stitches and the new head are not the resampled net's
        tried.add(target)
        spec = CompositionSpec.model_validate({"method": "resample", "base": m, "budget": {"max_params": target}})
        try:
            art = Resample().build(spec, BuildContext(bases={m: (card, net)}, load_task=_no_task))
        except InvalidInput:
            break
        small = Resample().materialize(art.config, art.tensors, {m: net})
        params = _params(_assembled(found, _single(found, m, (name, small, 0)), {**found.nets, name: small}, True))
        if params <= limit and (best is None or params > best[0]):
            best = (params, small, tensor_bytes(art.tensors.values()))
        own = sum(p.numel() for p in small.parameters())
        target = own + (limit - params) if params <= limit else min(target, own) - 1 - (params - limit)
    if best is None:
        print(f"reassemble bench: {m} cannot be resampled to {limit:,} parameters; no such row", flush=True)
        return None
    return name, best[1], best[2]


def _no_task(task, card):
    raise AssertionError("resample without a task reads no data")


def _assembled(found: Search, cand: Candidate, nets: dict[str, nn.Module], single: bool) -> Assembled:
    """The candidate's network; ``single``: a stitch at every cut (a single model's control)."""
    shapes = shapes_of(nets, [b.model for b in cand.blocks], found.card.input.channels, found.card.input.size)
    return build_assembled(list(cand.blocks), nets, shapes, len(found.data.labels), stitch_all=single)


def _train(
    found: Search,
    cand: Candidate,
    key: str,
    tuning: str,
    seed: int,
    quick: bool,
    single: bool,
    extra: tuple | None = None,
    test: bool = True,
) -> tuple[Run, Assembled]:
    """The candidate's network with least-squares stitches, trained: stitches and head (freeze), or
    also every block, on trainable copies (full; their BatchNorm statistics stay frozen, as
    freeze-tuning keeps them). ``extra``: a resampled network (name, net, its path's bytes); ``test``
    False: the test images are not read (the run's test accuracy is NaN)."""
    nets = dict(found.nets) | ({extra[0]: extra[1]} if extra else {})
    if tuning == "full":
        nets = {m: copy.deepcopy(nets[m]).requires_grad_(True) for m in dict.fromkeys(b.model for b in cand.blocks)}
    torch.manual_seed(seed)
    model = _assembled(found, cand, nets, single)
    fit_stitches(model, list(cand.blocks), nets, found.probe)
    blocks = [p for m in run_modules(model)[:-2] for p in m.parameters()] if tuning == "full" else []
    model.train()
    d, spec = found.data, found.card.input
    fit(
        model,
        stitch_params(model),
        d.train_x,
        d.train_y,
        spec,
        epochs=SIZES[quick][1],
        lr=LR,
        batch_size=64,
        seed=seed,
        slow=blocks,
        slow_lr=BLOCK_LR,
    )
    model.eval()
    if tuning == "full":
        stored = assembled_bytes(model)
    else:
        stored = tensor_bytes(path_tensors(model).values()) + (extra[2] if extra else 0)
    run = Run(
        cand.label(),
        key,
        _params(model),
        2 * macs(model, normalize(d.test_x[:1], spec)),
        stored,
        accuracy(model, d.val_x, d.val_y, spec),
        accuracy(model, d.test_x, d.test_y, spec) if test else float("nan"),
    )
    return run, model


def _params(model: Assembled) -> int:
    return sum(p.numel() for p in {id(p): p for m in run_modules(model) for p in m.parameters()}.values())


# -- the doc's tables -------------------------------------------------------------------------------------------------


def _preamble(seeds, quick: bool) -> str:
    pool = ", ".join(b.id for b in ZOOS["complementary"].bases)
    return (
        f"Pool: the complementary zoo ({pool}; docs/zoo.md), K = {BLOCKS} blocks. Tasks: "
        + "; ".join(f"`{t}`, {d}" for t, d in TASKS.items())
        + f". Seeds {', '.join(map(str, seeds))}: the seed draws the {SIZES[quick][0]} training "
        "images per label, the probe, the partition's restarts and the initialisation; validation: the "
        "task's fixed draw (200 per label), read for every choice; test: read once per number. Every "
        f"network: stitches from the least-squares start, then {SIZES[quick][1]} epochs of Adam "
        f"(cosine, batches of 64) on the same images: *freeze*, stitches and head (lr {LR}); "
        f"*full*, also every block, on a trainable copy (lr {BLOCK_LR} for the blocks, BatchNorm "
        "statistics frozen). "
        "Budgets: fractions of the largest pool model's parameters as the table trains it (stitches at its "
        "cuts, a new head over the task's labels); the cuts are the seed's partition's, so a budget's "
        "absolute size may differ a little between seeds. "
        "Rows per budget: *reassembled*, the method at that budget (the chosen proxy's best assembly); "
        "*best single within budget*, of the pool models cut at their partition cuts with a stitch at "
        "every cut (the reassembled network's kind of trainable parts; it has a stitch only where two "
        "models meet, so the controls have as many or more), the one best on validation among those that "
        "fit; *single resampled to budget*, the single model best on validation (freeze-tuned) among "
        "those over the budget, resampled by this project's resample method (no tuning) to the most "
        "parameters that fit, with the same stitches (none at 100%: the largest model fits). Params and "
        "FLOPs (torch's flop counter, one image): of the "
        "network as run (blocks, stitches, head), mean over seeds. Stored: bytes a path keeps beyond the "
        "zoo (freeze: stitches, head and a resample path's tensors; full: every tensor the network "
        "runs). Latency: time over the largest pool model's with stitches, measured alternately in one "
        "worker process on seed 0's networks (while the other worker ran), one image and a batch of 64. "
        "Δ: per seed, reassembled minus the row, its mean and 95% t-interval. The network column names "
        "seed 0's freeze-tuned pick; a fully tuned control is chosen on validation on its own and may be "
        "another model.\n"
    )


def _tau_table(taus: dict, tasks: list[str], seeds, proxy: str, drawn: int) -> list[str]:
    lines = [
        "### The proxies on validation\n",
        f"Kendall's tau between each proxy and validation accuracy after freeze-tuning, over "
        f"{drawn} assemblies per task and seed drawn at random within the largest budget; "
        "mean ± std over seeds (a tau that is undefined, the scores or accuracies all alike, counts as 0). "
        "The search below uses the proxy with the highest mean tau over every task and seed (this phase "
        f"reads no test image): **{proxy}**.\n",
        "| task | " + " | ".join(PROXIES) + " |",
        "|---|" + "---:|" * len(PROXIES),
    ]
    for task in tasks:
        cells = [mean_std([taus[task, s][p] for s in seeds], 2) for p in PROXIES]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    means = [f"{_mean_tau(taus.values(), p):+.2f}" for p in PROXIES]
    lines.append("| all (mean) | " + " | ".join(means) + " |")
    return [*lines, ""]


def _tables(task: str, runs: list[SeedRuns]) -> list[str]:
    lines = [
        f"### {task}: {TASKS[task]}\n",
        "| budget | network | seed 0's network | params | FLOPs | stored, freeze / full | latency x1 / x64 "
        "| freeze: test | full: test | Δ freeze | Δ full |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for budget in BUDGETS:
        for row in ROWS:
            cell = {t: [r.runs.get((budget, row, t)) for r in runs] for t in TUNINGS}
            if any(x is None for xs in cell.values() for x in xs):
                continue
            first = cell["freeze"][0]
            lat = runs[0].latency.get(first.key, (float("nan"), float("nan")))
            deltas = {t: "—" if row == ROWS[0] else _delta(runs, budget, row, t) for t in TUNINGS}
            lines.append(
                f"| {budget:.0%} | {row} | {first.label} | {statistics.fmean(x.params for x in cell['freeze']):,.0f} "
                f"| {statistics.fmean(x.flops for x in cell['freeze']):,.0f} "
                f"| {statistics.fmean(x.stored for x in cell['freeze']):,.0f} / "
                f"{statistics.fmean(x.stored for x in cell['full']):,.0f} | {lat[0]:.2f} / {lat[1]:.2f} "
                f"| {mean_std([x.test for x in cell['freeze']])} | {mean_std([x.test for x in cell['full']])} "
                f"| {deltas['freeze']} | {deltas['full']} |"
            )
        verdicts += [_verdict(runs, budget, t) for t in TUNINGS]
    lines += ["", f"Partition (seed 0): {'; '.join(runs[0].partition)}", "", *verdicts, ""]
    return lines


def _delta(runs: list[SeedRuns], budget: float, row: str, tuning: str) -> str:
    ours = [r.runs[budget, ROWS[0], tuning].test for r in runs]
    return paired_interval(ours, [r.runs[budget, row, tuning].test for r in runs])


def _verdict(runs: list[SeedRuns], budget: float, tuning: str) -> str:
    """The criterion at one budget and tuning: the reassembled network above each control outside the
    interval, at FLOPs no more than that control's."""
    ours = [r.runs[budget, ROWS[0], tuning] for r in runs]
    parts = []
    for row in ROWS[1:]:
        theirs = [r.runs.get((budget, row, tuning)) for r in runs]
        if any(t is None for t in theirs):
            continue
        mean, low, _ = t_interval([o.test for o in ours], [t.test for t in theirs])  # type: ignore[union-attr]
        cheaper = statistics.fmean(o.flops for o in ours) <= statistics.fmean(t.flops for t in theirs)  # type: ignore[union-attr]
        beats = "beats" if low > 0 else "does not beat"
        parts.append(
            f"{beats} {row} ({mean:+.4f}, interval low {low:+.4f}) at {'no more' if cheaper else 'more'} FLOPs"
        )
    return f"- {budget:.0%}, {tuning}: the reassembled network " + ("; ".join(parts) or "has no control here")
