"""The clone (PNC) tables, issue 28: the article's topology against late fusion (full and at the
clone's cost), head-only tuning, full fine-tuning and fine-tuning with a distillation term (LwF), in
two data regimes, with the ablations of localization; every row with its cost and bytes.

``zoo bench --suite clone`` (docs/methods/clone.md). Every choice is made on validation images;
test images are read once per number.
"""

from __future__ import annotations

import copy
import multiprocessing
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import Say, bench_data_dir, demo_store, dir_store, macs, mean_std, paired_interval, time_ratio
from zoo_store.archs import TapNet
from zoo_store.archs.surgery import state_bytes
from zoo_store.core.bundle import encode_bundle, make_manifest
from zoo_store.core.cards import Card
from zoo_store.core.spec import CompositionSpec, TaskSpec
from zoo_store.core.weights import digest_of
from zoo_store.datasets.builtin import BUILTINS
from zoo_store.datasets.tasks import TaskData, make_task
from zoo_store.methods.base import BuildContext
from zoo_store.methods.clone.insert import Part, candidates, learn_together, search_join
from zoo_store.methods.clone.method import Clone, held_out
from zoo_store.methods.resample.method import Resample
from zoo_store.store.zoos import build_zoo
from zoo_store.training import accuracy, deterministic, fit, fused_head, init_head_rows, normalize

SEEDS = (0, 1, 2, 3, 4)
WORKERS = 2  # processes, one thread each
EPOCHS = 5  # every trained row: the same epochs over the same images
LR_HEAD, LR_FT = 1e-2, 1e-3  # heads and adapters; whole networks
LWF_WEIGHT, LWF_T = 1.0, 2.0  # the distillation term on the target's own outputs (Li & Hoiem)
BALANCED = 60  # training images per label, every label
PLENTY, FEW = 120, 5  # the article's regime: per cloned label, per label of the target's own
VAL = 100  # validation images per label (the first of the task's fixed validation draw)


@dataclass(frozen=True)
class Case:
    name: str
    dataset: str
    target: str
    sources: tuple[tuple[str, tuple[str, ...]], ...]  # (source id, the labels cloned from it)


CASES = (
    Case(
        "letters into a digit net", "mnist-letters", "mnist-mobilenet-wide", (("letters-resnet-wide", tuple("ABCDE")),)
    ),
    Case("digits into a shape net", "shapes-mnist", "shapes-vgg-wide", (("mnist-mobilenet-wide", tuple("01234")),)),
    Case("MNIST 5-9 into 0-4", "mnist", "resnet-mnist-0-4", (("resnet-mnist-5-9", tuple("56789")),)),
    Case(
        "letters and gratings into a digit net (P = 2)",
        "mnist-letters-textures",
        "mnist-mobilenet-wide",
        (
            ("letters-resnet-wide", tuple("ABCDE")),
            ("textures-convnext-wide", ("0deg-coarse", "60deg-coarse", "120deg-coarse")),
        ),
    ),
)
REGIMES = ("balanced", "article")
LOCALIZATIONS = ("joint", "once", "none", "random")  # the clone, then its ablations
MEASURED = ("accuracy", "accuracy_target_labels", "target_alone_accuracy", "agreement_target_labels")
MASK_STEPS = 40  # mask-fitting steps per round (the service's default is 150): the bench's budget


def clone_suite(say: Say, quick: bool) -> list[str]:
    """Every (case, regime, seed) run in ``WORKERS`` processes of one thread each (small networks use
    one core well and two badly), then the tables in order."""
    store = demo_store(say, quick)
    build_zoo(store, "complementary", 0, say)
    seeds = SEEDS[:2] if quick else SEEDS
    cases = CASES[:1] if quick else CASES
    jobs = [(case, regime, seed) for case in cases for regime in REGIMES for seed in seeds]
    lines = [_preamble(seeds)]
    with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
        done = iter(pool.imap(_job, jobs, chunksize=1))
        for case in cases:
            for regime in REGIMES:
                runs = [next(done) for _ in seeds]
                lines += _tables(case, regime, runs)
                say("\n".join(_tables(case, regime, runs)))  # each table as it is done: a long run shows progress
    return lines


def _job(job: tuple[Case, str, int]) -> dict:
    torch.set_num_threads(1)
    return _run(dir_store(bench_data_dir()), *job, say=print)


# -- one run: every row of one case, regime and seed ------------------------------------------------------------------


def _run(store, case: Case, regime: str, seed: int, say: Say) -> dict:
    say(f"clone bench: {case.name}, {regime}, seed {seed}")
    cards = store.cards()
    t_card = cards[case.target]
    bases = {k: (cards[k], store.load_base(cards[k])) for k in [case.target, *(s for s, _ in case.sources)]}
    digests = {k: digest_of(n) for k, (_, n) in bases.items()}
    data = _data(case, regime, t_card, seed)
    target = bases[case.target][1]
    probe = normalize(data.test_x[:1], t_card.input)  # (1, C, H, W): the cost of one image
    out: dict = {"rows": {}, "target_macs": macs(target, probe)}
    memo: dict = {}
    for loc in LOCALIZATIONS:
        method = _memo(Clone(), memo)
        method.localization = loc
        spec = _spec(case, seed)
        art = method.build(spec, BuildContext(bases=bases, load_task=lambda t, c, d=data: d))
        nets = {k: n for k, (_, n) in bases.items()}
        model = method.materialize(art.config, art.tensors, nets)
        bundle = len(encode_bundle(make_manifest(art), art.tensors, art.metrics))
        row = {k: art.metrics[k] for k in MEASURED} | {"macs": macs(model, probe), "bytes": bundle, "_model": model}
        row |= {
            "joins": [f"{s['insert']}->{s['depth']}" for s in art.config["sources"]],
            "kept": statistics.fmean(art.metrics[f"source{i}_kept_fraction"] for i in range(len(case.sources))),
            "rounds": len(art.metrics["rounds_val_accuracy"]),
            "val": accuracy(model, data.val_x, data.val_y, t_card.input),
        }
        out["rows"][f"clone ({loc})" if loc != "joint" else "clone"] = row
    sources = [(bases[s][0], bases[s][1], labels) for s, labels in case.sources]
    fusion = _late_fusion(target, t_card, [n for _, n, _ in sources], sources, data, seed)
    out["rows"]["late fusion"] = _measured(fusion, target, t_card, data, probe, state_bytes(fusion.head))
    small, small_bytes = _matched_sources(sources, out["rows"]["clone"]["macs"] - out["target_macs"], probe)
    matched = _late_fusion(target, t_card, small, sources, data, seed)
    out["rows"]["late fusion, matched cost"] = _measured(
        matched, target, t_card, data, probe, state_bytes(matched.head) + small_bytes
    )
    head = _late_fusion(target, t_card, [], [], data, seed)  # the target's features alone
    out["rows"]["head-only"] = _measured(head, target, t_card, data, probe, state_bytes(head.head))
    for name, lwf in (("full FT", 0.0), ("LwF", LWF_WEIGHT)):
        net = _fine_tuned(store, t_card, data, seed, lwf)
        out["rows"][name] = _measured(net, target, t_card, data, probe, state_bytes(net))
    out["source_alone"] = [_source_alone(n, c, labels, data) for c, n, labels in sources]
    out["target_alone"] = out["rows"]["clone"]["target_alone_accuracy"]
    assert {k: digest_of(n) for k, (_, n) in bases.items()} == digests, "a base changed during the experiment"
    models = {name: row.pop("_model") for name, row in out["rows"].items()}
    if seed == SEEDS[0]:  # latency: one run of every row's seed-0 model against the target alone
        out["latency"] = _latency(models, target, probe)
    return out


def _data(case: Case, regime: str, t_card: Card, seed: int) -> TaskData:
    """The seed's correction data: ``BALANCED`` per label, or the article's regime (``PLENTY`` per
    cloned label, ``FEW`` per label of the target's own)."""
    labels = [*t_card.labels, *(x for _, ls in case.sources for x in ls)]
    per = BALANCED if regime == "balanced" else PLENTY
    task = TaskSpec(dataset=case.dataset, labels=labels, samples_per_label=per)
    data = make_task(BUILTINS[case.dataset].make(), task, t_card.input, seed)
    val = torch.cat([torch.nonzero(data.val_y == k).flatten()[:VAL] for k in range(len(data.labels))])
    gen = torch.Generator().manual_seed(seed)
    keep = torch.ones(len(data.train_y), dtype=torch.bool)
    for k, label in enumerate(data.labels):
        if regime == "article" and label in t_card.labels:
            rows = torch.nonzero(data.train_y == k).flatten()
            keep[rows[torch.randperm(len(rows), generator=gen)[FEW:]]] = False
    return TaskData(
        data.train_x[keep], data.train_y[keep], data.test_x, data.test_y, data.labels, data.val_x[val], data.val_y[val]
    )


def _spec(case: Case, seed: int) -> CompositionSpec:
    return CompositionSpec.model_validate(
        {
            "method": "clone",
            "base": case.target,
            "sources": [{"model": m, "labels": list(ls)} for m, ls in case.sources],
            "task": {"dataset": case.dataset},
            "train": {"epochs": EPOCHS, "lr": LR_HEAD, "batch_size": 64, "seed": seed, "steps": MASK_STEPS},
        }
    )


def _memo(method: Clone, memo: dict) -> Clone:
    """The join search depends on no localization: it runs once per case, regime and seed, shared
    by the four builds; the random ablation draws its masks from the joint masks of the same run
    (the alternation runs once: its replay sets the masks it found)."""

    def search(target, t_card, parts, which, data, **kw):
        key = ("search", which, tuple((p.card.id, p.join) for p in parts))
        if key not in memo:
            memo[key] = search_join(target, t_card, parts, which, data, **kw)
        return memo[key]

    def together(model, residents, parts, data, t_card, **kw):
        if "together" not in memo:
            history = learn_together(model, residents, parts, data, t_card, **kw)
            memo["together"] = (history, [p.masks for p in parts])
        history, masks = memo["together"]
        for part, m in zip(parts, masks, strict=True):
            part.masks = m
        return history

    method.search, method.together = search, together  # type: ignore[method-assign]
    return method


def _measured(model: nn.Module, target: TapNet, t_card: Card, data: TaskData, probe: Tensor, stored: int) -> dict:
    """Test accuracies (union, target's labels, agreement), MACs of one image and stored bytes."""
    return held_out(model, target, t_card, data) | {"macs": macs(model, probe), "bytes": stored, "_model": model}


def _latency(models: dict[str, nn.Module], target: TapNet, probe: Tensor) -> dict[str, tuple[float, float]]:
    """Each model's time over the target's, for one image and for a batch of 64, in one run."""
    batch = probe.repeat(64, 1, 1, 1)  # (64, C, H, W)
    out = {}
    with torch.inference_mode():
        for name, m in models.items():
            out[name] = tuple(
                time_ratio(lambda m=m, x=x: m(x), lambda x=x: target(x), repeat=30, warmup=5) for x in (probe, batch)
            )
    return out  # type: ignore[return-value]


class _Fusion(nn.Module):
    """A head over the frozen feature vectors of the target and the (possibly resampled) sources."""

    def __init__(self, nets: list[nn.Module], head: nn.Linear):
        super().__init__()
        self.nets, self.head = nets, head  # plain attributes: never trained

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([n.embed(x) for n in self.nets], 1))  # (B, sum D) -> (B, K)


def _late_fusion(target: TapNet, t_card: Card, nets: list[nn.Module], sources, data: TaskData, seed: int) -> _Fusion:
    """Late fusion: its rows for each base's labels start from that base's head (as the clone's)."""
    torch.manual_seed(seed)
    parts = [(target.head_layer, t_card.labels, [x for x in data.labels if x in t_card.labels])]
    parts += [(n.head_layer, c.labels, labels) for n, (c, _, labels) in zip(nets, sources, strict=True)]
    model = _Fusion([target, *nets], fused_head(parts, data.labels))
    fit(model, model.head.parameters(), data.train_x, data.train_y, t_card.input, **_fit(seed, LR_HEAD))
    return model.eval()


_RESAMPLED: dict[tuple[str, float], tuple[nn.Module, int, int]] = {}


def _matched_sources(sources, budget: int, probe: Tensor) -> tuple[list[nn.Module], int]:
    """Every source resampled (this project's resample method, no tuning) to the largest common width
    whose MACs together fit ``budget`` (the clone's MACs beyond the target's); returns the networks
    and the bytes of their paths."""
    widths = [w / 20 for w in range(20, 1, -1)]  # 1.0 down to 0.1
    for w in widths:
        nets = [_resampled(card, net, w, probe) for card, net, _ in sources]
        if sum(m for _, m, _ in nets) <= budget or w == widths[-1]:
            return [n for n, _, _ in nets], sum(b for _, _, b in nets)
    raise AssertionError("unreachable")


def _resampled(card: Card, net: TapNet, width: float, probe: Tensor) -> tuple[nn.Module, int, int]:
    if (card.id, width) not in _RESAMPLED:
        if width == 1.0:
            _RESAMPLED[card.id, width] = (net, macs(net, probe), 0)
        else:
            spec = CompositionSpec.model_validate({"method": "resample", "base": card.id, "budget": {"width": width}})
            art = Resample().build(spec, BuildContext(bases={card.id: (card, net)}, load_task=_no_task))
            small = Resample().materialize(art.config, art.tensors, {card.id: net})
            stored = len(encode_bundle(make_manifest(art), art.tensors, art.metrics))
            _RESAMPLED[card.id, width] = (small, macs(small, probe), stored)
    return _RESAMPLED[card.id, width]


def _no_task(task, card):
    raise AssertionError("resample without a task reads no data")


def _fine_tuned(store, t_card: Card, data: TaskData, seed: int, lwf: float) -> TapNet:
    """A trainable copy of the target and a head (its rows from the target's), BatchNorm statistics
    frozen (the stronger variant in docs/methods/reprogram.md); with ``lwf`` > 0, plus ``lwf`` times
    the distillation term (temperature ``LWF_T``) between its logits on the target's labels and the
    original target's, on every training image."""
    original = store.load_base(t_card)
    net = copy.deepcopy(original)
    torch.manual_seed(seed)
    head = nn.Linear(net.feature_dim, len(data.labels))
    init_head_rows(head, net.head_layer, t_card.labels, data.labels)
    model = _Fusion([net], head)
    model.nets = nn.ModuleList([net])  # trained: a registered submodule
    for p in model.parameters():
        p.requires_grad_(True)
    own = [data.labels.index(x) for x in t_card.labels if x in data.labels]
    cols = [t_card.labels.index(data.labels[i]) for i in own]
    deterministic()
    opt = torch.optim.Adam(model.parameters(), lr=LR_FT)
    steps = EPOCHS * -(-len(data.train_x) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    model.eval()  # BatchNorm statistics frozen; their affine trains
    for _ in range(EPOCHS):
        order = torch.randperm(len(data.train_x), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            x = normalize(data.train_x[idx], t_card.input)
            logits = model(x)  # (B, K)
            loss = F.cross_entropy(logits, data.train_y[idx])
            if lwf > 0:
                with torch.no_grad():
                    old = F.log_softmax(original(x)[:, cols] / LWF_T, 1)  # (B, K_t)
                new = F.log_softmax(logits[:, own] / LWF_T, 1)
                loss = loss + lwf * LWF_T**2 * F.kl_div(new, old, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.requires_grad_(False).eval()


def _fit(seed: int, lr: float) -> dict:
    return {"epochs": EPOCHS, "lr": lr, "batch_size": 64, "seed": seed}


def _source_alone(net: TapNet, card: Card, labels: tuple[str, ...], data: TaskData) -> float:
    """The source on the test images of the labels it brings, its own head restricted to them."""
    from zoo_store.training import predict_logits

    rows = torch.tensor([data.labels[int(k)] in labels for k in data.test_y])
    cols = [card.labels.index(x) for x in labels]
    pred = predict_logits(net, data.test_x[rows], card.input)[:, cols].argmax(1)
    truth = torch.tensor([labels.index(data.labels[int(k)]) for k in data.test_y[rows]])
    return (pred == truth).float().mean().item()


# -- tables -----------------------------------------------------------------------------------------------------------


def _preamble(seeds) -> str:
    return (
        f"Seeds {', '.join(map(str, seeds))}; mean ± std over them; Δ: the per-seed paired difference to the "
        f"clone with its 95% t-interval. Correction data per seed: balanced, {BALANCED} training images per label; "
        f"the article's regime, {PLENTY} per cloned label and {FEW} per label of the target's own. Every trained "
        f"row: {EPOCHS} epochs, batches of 64, Adam with a cosine schedule, lr {LR_HEAD} for heads and adapters, "
        f"{LR_FT} for whole networks (BatchNorm statistics frozen); {MASK_STEPS} mask-fitting steps per round of the "
        f"alternation (and for masks fitted once); LwF adds {LWF_WEIGHT} x the distillation term "
        f"at temperature {LWF_T}. Joins and the alternation's rounds are chosen on validation images ({VAL} per "
        "label, the same for every seed and regime); test images are read once per number. "
        "MACs: one 28 x 28 image, torch's FLOP counter halved. "
        f"Latency: time over the target alone's, measured alternately in the same process (seed 0's models, one "
        f"thread, while the other of {WORKERS} worker processes ran its own runs), one image and a batch of 64. "
        "Bytes: what each row stores beyond the zoo (the clone's bundle; late fusion's head; at matched cost, its "
        "head and the resample paths; head-only's head; a fine-tuned copy's whole state)."
    )


def _tables(case: Case, regime: str, runs: list[dict]) -> list[str]:
    names = list(runs[0]["rows"])
    src = " + ".join(f"{m} ({', '.join(ls)})" for m, ls in case.sources)
    alone = "; ".join(f"{statistics.fmean(r['source_alone'][i] for r in runs):.4f}" for i in range(len(case.sources)))
    out = [
        f"\n### {case.name}, {regime} data\n",
        f"Target `{case.target}` on `{case.dataset}`, cloning {src}. Target alone on its labels: "
        f"{statistics.fmean(r['target_alone'] for r in runs):.4f}; source alone on the labels it brings: {alone}.\n",
        "| row | test (union) | Δ union vs clone | test (target's labels) | agreement with the target | "
        "Δ agreement vs clone | MACs | latency x1 | latency x64 | stored bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        vals = {k: [r["rows"][name][k] for r in runs] for k in runs[0]["rows"][name] if not k.startswith("_")}
        ref = {k: [r["rows"]["clone"][k] for r in runs] for k in ("accuracy", "agreement_target_labels")}
        lat = runs[0].get("latency", {}).get(name, (float("nan"), float("nan")))
        delta = "—" if name == "clone" else paired_interval(vals["accuracy"], ref["accuracy"])
        delta_a = (
            "—" if name == "clone" else paired_interval(vals["agreement_target_labels"], ref["agreement_target_labels"])
        )
        out.append(
            f"| {name} | {mean_std(vals['accuracy'])} | {delta} | {mean_std(vals['accuracy_target_labels'])} | "
            f"{mean_std(vals['agreement_target_labels'])} | {delta_a} | {statistics.fmean(vals['macs']):,.0f} | "
            f"{lat[0]:.2f} | {lat[1]:.2f} | {statistics.fmean(vals['bytes']):,.0f} |"
        )
    out += [
        "\nThe join each seed chose (target tap R -> source cut), the kept fraction of the source's layers "
        "after the cut, the alternation's rounds, and the target's MACs:\n",
        "| row | joins per seed | kept | rounds | validation |",
        "|---|---|---:|---:|---:|",
    ]
    for name in names:
        if not name.startswith("clone"):
            continue
        rs = [r["rows"][name] for r in runs]
        joins = "; ".join(" + ".join(r["joins"]) for r in rs)
        out.append(
            f"| {name} | {joins} | {mean_std([r['kept'] for r in rs], 2)} | "
            f"{statistics.fmean(r['rounds'] for r in rs):.1f} | {mean_std([r['val'] for r in rs])} |"
        )
    out.append(f"\nTarget alone: {runs[0]['target_macs']:,} MACs.")
    return out


def join_scores(store, case: Case, seed: int = 0) -> list[str]:
    """Validation accuracy of every join the search tries for the case's first source (balanced
    data, one epoch each, as the search runs it), deepest first."""
    cards = store.cards()
    t_card, target = cards[case.target], store.load_base(cards[case.target])
    s_id, labels = case.sources[0]
    source = store.load_base(cards[s_id])
    part = Part(source, cards[s_id], labels, candidates(target, source, t_card.input)[0])
    data = _data(case, "balanced", t_card, seed)
    _, scores = search_join(target, t_card, [part], 0, data, lr=LR_HEAD, batch_size=64, seed=seed, tolerance=0.005)
    return [f"| {case.name} | " + "; ".join(f"{k} {v:.4f}" for k, v in scores.items()) + " |"]


if __name__ == "__main__":  # the join scores alone: ZOO_DATA_DIR=./data python -m bench.clone
    store = dir_store(bench_data_dir())
    print("| case | validation accuracy per join (R->cut), deepest first |\n|---|---|")
    for case in CASES:
        print("\n".join(join_scores(store, case)))
