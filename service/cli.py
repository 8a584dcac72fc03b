"""The ``zoo`` command line. Everything but serve, worker and bench talks HTTP through ZooClient."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from service.client import ApiError, ZooClient

app = typer.Typer(help="zoo: compose new models out of a zoo of frozen networks", no_args_is_help=True)
models_app = typer.Typer(help="zoo models", no_args_is_help=True)
datasets_app = typer.Typer(help="datasets", no_args_is_help=True)
bundle_app = typer.Typer(help="portable .zoopath bundles", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
app.add_typer(bundle_app, name="bundle")
console = Console()
Url = Annotated[str, typer.Option("--url", envvar="ZOO_URL", help="the server")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str) -> ZooClient:
    return ZooClient(url)


def _fail(e: ApiError) -> None:
    console.print(f"[red]error{f' {e.status}' if e.status else ''}[/red]: {e.problem.get('detail', e.problem)}")
    raise typer.Exit(1)


def _cell(value: object) -> str:
    if isinstance(value, list | tuple):
        text = ",".join(map(str, value))
        return text if len(text) <= 24 else f"{len(value)} ({text[:18]}…)"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(rows: list[dict], cols: list[str]) -> None:
    t = Table()
    for c in cols:  # ids are what users copy: never cut
        t.add_column(c, no_wrap=c == "id", min_width=max((len(str(r[c])) for r in rows), default=2) if c == "id" else None)
    for r in rows:
        t.add_row(*[_cell(r.get(c, "")) for c in cols])
    console.print(t)


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    access_log: bool = True,
    workers: Annotated[int | None, typer.Option(help="HTTP worker processes (ZOO_HTTP_WORKERS; default: cores; "
                                                     "0: one process for everything)")] = None,
) -> None:
    """Run the API (embedded mode: SQLite, HTTP workers in front of one inference process, jobs in
    child processes). Stops everything it started on Ctrl-C or SIGTERM."""
    import logging

    from service.supervisor import serve as run

    if workers is not None:
        os.environ["ZOO_HTTP_WORKERS"] = str(workers)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    run(host, port, access_log)


@app.command()
def worker() -> None:
    """Distributed mode: consume composition jobs from Redis Streams until stopped."""
    import logging
    import signal

    from service.state import Services
    from zoo_store.settings import Settings

    logging.basicConfig(level=logging.INFO)
    settings = Settings(mode="distributed")
    svc = Services.create(settings)
    svc.db.migrate()
    svc.zoo.load_all()
    svc.runner.start()
    console.print(f"worker: {len(svc.zoo.bases)} bases resident, consuming jobs from {settings.redis_url}")
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    svc.stop()


@models_app.command("list")
def models_list(url: Url = DEFAULT_URL) -> None:
    try:
        rows = [{**m, "accuracy": m["metrics"].get("accuracy", "")} for m in _client(url).models()]
        _table(rows, ["id", "arch", "num_params", "bytes", "labels", "accuracy"])
    except ApiError as e:
        _fail(e)


@models_app.command("show")
def models_show(model_id: str, url: Url = DEFAULT_URL) -> None:
    try:
        console.print_json(data=_client(url).model(model_id))
    except ApiError as e:
        _fail(e)


@models_app.command("add")
def models_add(card: Path, weights: Path, url: Url = DEFAULT_URL) -> None:
    """Register a base from a card JSON file and a weights file (.safetensors or .pth)."""
    try:
        out = _client(url).add_model(json.loads(card.read_text()), weights.read_bytes(), weights.name)
        console.print(f"added {out['id']} digest {out['digest']}")
    except ApiError as e:
        _fail(e)


@models_app.command("pull")
def models_pull(
    source: str, model_ids: Annotated[list[str] | None, typer.Argument()] = None, url: Url = DEFAULT_URL
) -> None:
    """Copy bases (all, or the ones named) from another server's public zoo into this one."""
    src, dst = _client(source), _client(url)
    try:
        for card in src.models():
            if model_ids and card["id"] not in model_ids:
                continue
            keys = ("id", "arch", "arch_config", "labels", "input", "metrics", "description")
            out = dst.add_model({k: card[k] for k in keys}, src.model_weights(card["id"]))
            status = "same digest" if out["digest"] == card["digest"] else "DIGEST DIFFERS"
            console.print(f"{out['id']}: {status}")
    except ApiError as e:
        _fail(e)


@datasets_app.command("list")
def datasets_list(url: Url = DEFAULT_URL) -> None:
    try:
        _table(_client(url).datasets(), ["id", "source", "num_samples", "shape", "labels", "name"])
    except ApiError as e:
        _fail(e)


@datasets_app.command("add")
def datasets_add(file: Path, name: str | None = None, url: Url = DEFAULT_URL) -> None:
    """Upload an ImageFolder zip or an .npz (x, y, labels)."""
    try:
        out = _client(url).add_dataset(file, name)
        console.print(f"added dataset {out['id']}: {out['num_samples']} samples, labels {out['labels']}")
    except ApiError as e:
        _fail(e)


@app.command()
def compose(spec: Path, url: Url = DEFAULT_URL) -> None:
    """Submit a task spec (JSON file) and show progress until the job ends."""
    client = _client(url)
    try:
        job = client.compose(json.loads(spec.read_text()))
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                      console=console) as bar:  # fmt: skip
            task = bar.add_task(f"job {job['id']}", total=1.0, info="queued")
            for event in client.events(job["id"]):
                p = event["progress"]
                info = " ".join([event["state"], str(p.get("step", f"epoch {p['epoch']}" if "epoch" in p else "")),
                                 f"loss {p['loss']:.4f}" if "loss" in p else ""])  # fmt: skip
                bar.update(task, completed=p.get("fraction", 0.0), info=info)
        job = client.job(job["id"])
    except ApiError as e:
        _fail(e)
    if job["state"] != "succeeded":
        console.print(f"[red]job {job['state']}[/red]: {job.get('error')}")
        raise typer.Exit(1)
    console.print(f"path [bold]{job['path_id']}[/bold] accuracy {job['metrics'].get('accuracy')}")


@app.command()
def predict(path_id: str, images: list[Path], top_k: int = 1, url: Url = DEFAULT_URL) -> None:
    """Predict PNG/JPEG images with a path."""
    try:
        out = _client(url).predict_images(path_id, images, top_k)
    except ApiError as e:
        _fail(e)
    for img, p in zip(images, out["predictions"], strict=True):
        ranked = "  ".join(f"{s['label']} ({s['score']:.3f})" for s in p["top_k"])
        console.print(f"{img}: {ranked}")


@bundle_app.command("export")
def bundle_export(path_id: str, out: Path | None = None, url: Url = DEFAULT_URL) -> None:
    try:
        data = _client(url).bundle(path_id)
    except ApiError as e:
        _fail(e)
    out = out or Path(f"{path_id}.zoopath")
    out.write_bytes(data)
    console.print(f"wrote {out} ({len(data)} bytes)")


@bundle_app.command("network")
def bundle_network(path_id: str, out: Path | None = None, url: Url = DEFAULT_URL) -> None:
    """Write a resample path as a standalone network (safetensors + card) for devices without the service."""
    try:
        data = _client(url).network(path_id)
    except ApiError as e:
        _fail(e)
    out = out or Path(f"{path_id}.safetensors")
    out.write_bytes(data)
    console.print(f"wrote {out} ({len(data)} bytes); load it with zoo_store.archs.standalone.load_network")


@bundle_app.command("import")
def bundle_import(file: Path, url: Url = DEFAULT_URL) -> None:
    try:
        out = _client(url).import_bundle(file.read_bytes())
    except ApiError as e:
        _fail(e)
    console.print(f"imported path {out['id']} ({out['method']}, {out['bytes']} bytes)")


@app.command()
def bench(
    out: Path = Path("docs/benchmarks.md"),
    suite: Annotated[str, typer.Option(help="serving | scale | http | reprogram | resample | clone | reassemble | all")] = "serving",
    quick: bool = False,
) -> None:
    """Measure ratios side by side in one run and write them to docs/ with the machine."""
    from service.bench import run_bench

    run_bench(out, suite=suite, quick=quick, say=console.print)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
