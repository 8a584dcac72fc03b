"""``zoo bench``'s entry point: ``run_bench`` runs one suite (or all) and rewrites its block in docs/."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from bench.architectures import architectures_suite
from bench.clone import clone_suite
from bench.cluster import cluster_suite
from bench.common import Say, machine, write_block
from bench.edge import edge_suite
from bench.export import export_suite
from bench.http import http_suite
from bench.reassemble import reassemble_suite
from bench.reprogram import reprogram_budget_suite, reprogram_suite
from bench.resample import resample_suite
from bench.scale import scale_suite
from bench.serving import serving_suite


def run_bench(out: Path, suite: str, quick: bool, say: Say = print) -> None:
    suites = {
        # name: (suite, file, its title, the block within the file)
        "serving": (serving_suite, out, "Benchmarks", ""),
        "scale": (scale_suite, out, "Benchmarks", "scale"),
        "http": (http_suite, out, "Benchmarks", "http"),
        "edge": (edge_suite, out.parent / "serving.md", "Serving many paths over one resident zoo", "edge"),
        "reprogram": (reprogram_suite, out.parent / "methods" / "reprogram.md", "Reprogram (CLR)", ""),
        "reprogram-budget": (
            reprogram_budget_suite,
            out.parent / "methods" / "reprogram.md",
            "Reprogram (CLR)",
            "budget",
        ),
        "resample": (resample_suite, out.parent / "methods" / "resample.md", "Resample (INN)", ""),
        "clone": (clone_suite, out.parent / "methods" / "clone.md", "Clone (PNC)", ""),
        "reassemble": (reassemble_suite, out.parent / "methods" / "reassemble.md", "Reassemble (DeRy)", ""),
        "export": (export_suite, out.parent / "export.md", "Exporting a path", ""),
        "cluster": (cluster_suite, out.parent / "deploy.md", "Deploying zoo", ""),
        "architectures": (architectures_suite, out.parent / "architectures.md", "Architectures", ""),
    }
    if suite != "all" and suite not in suites:
        raise SystemExit(f"unknown suite {suite!r}; choose one of {[*suites, 'all']}")
    # "all": every suite that needs nothing but this checkout (cluster needs PostgreSQL, Redis and nginx;
    # architectures builds all 80 torchvision classifiers: a run of its own)
    chosen = [n for n in suites if n not in ("cluster", "architectures")] if suite == "all" else [suite]
    for name in chosen:
        fn, target, title, block = suites[name]
        body = fn(say, quick)
        cmd = f"zoo bench --suite {name}{' --quick' if quick else ''}"
        header = [f"Command: `{cmd}`  ", f"Machine: {machine()}  ", f"Date: {dt.date.today()}\n"]
        write_block(target, title, "\n".join(header + body), name=block)
        say(f"wrote {target}")
