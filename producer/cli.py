"""`bgswap`: the command line (typer + rich). Commands stay thin; see producer/runner.py."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from producer import runner
from producer.batch import SubmitReport, check_batch_id, estimate, new_batch_id, output_root
from producer.manifest import RowDefaults, RowOutcome, read_manifest
from producer.skips import Skipper
from worker.errors import ManifestUnreadable, RowCanceled, Unreachable, UsageError
from worker.providers import default_provider
from worker.report import manifest_lines, write_csv, write_jsonl
from worker.settings import Settings, load_settings
from worker.state import TERMINAL_STATES, BatchNotFound, BatchStore

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Swap product-image backgrounds in bulk.",
)
err = Console(stderr=True)
MAX_SHOWN_ERRORS = 50

ProviderOpt = Annotated[
    str | None, typer.Option("--provider", help="runware | fal | local (default: by keys set)")
]
OutputOpt = Annotated[
    str | None, typer.Option("--output", help="s3://bucket/prefix/ or a local directory")
]
PromptOpt = Annotated[str | None, typer.Option("--prompt", help="default prompt template")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="NAME=VALUE default for an option column")
]
BatchIdOpt = Annotated[str | None, typer.Option("--batch-id", help="batch id (default: new)")]
MaxCostOpt = Annotated[
    float | None, typer.Option("--max-cost", help="refuse if the estimate is above (USD)")
]
FormatOpt = Annotated[
    str | None, typer.Option("--format", help="manifest format: csv | jsonl (default: by name)")
]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="refuse the whole manifest on any bad row")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="run every row, even those already done at --output")
]


def main() -> None:
    try:
        app()
    except (UsageError, ManifestUnreadable) as exc:
        # One line, however long: scripts read it (soft_wrap: no wrapping at 80 columns).
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except BatchNotFound as exc:
        err.print(f"[red]error:[/red] no batch {exc}", highlight=False)
        sys.exit(2)
    except Unreachable as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(3)


def _settings() -> Settings:
    return load_settings()


class RowReporter:
    """Prints each rejected row once (up to a limit) while the manifest streams."""

    def __init__(self) -> None:
        self.shown = 0
        self.hidden = 0

    def __call__(self, outcome: RowOutcome) -> None:
        for error in outcome.errors:
            if self.shown < MAX_SHOWN_ERRORS:
                err.print(
                    f"[yellow]rejected[/yellow] {error} [dim]({error.code})[/dim]", highlight=False
                )
                self.shown += 1
            else:
                self.hidden += 1

    def close(self) -> None:
        if self.hidden:
            err.print(f"... and {self.hidden} more errors (see the output manifest)")


def _progress(rows: bool = False) -> Progress:
    """A progress bar on stderr; `rows`: the total is in bytes read, so show a percentage."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn() if rows else MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def _check_manifest(
    settings: Settings,
    manifest: runner.ManifestInput,
    defaults: RowDefaults,
    *,
    strict: bool,
    max_cost: float | None,
    skipper: Skipper | None = None,
) -> None:
    """--strict and --max-cost need the whole manifest before anything is enqueued."""
    if not strict and max_cost is None:
        return
    report = estimate(
        read_manifest(manifest.stream, manifest.fmt, defaults),
        runner.provider_cache(settings),
        skipper,
    )
    manifest.stream.seek(0)
    if strict and report.rejected:
        for error in report.errors[:MAX_SHOWN_ERRORS]:
            err.print(f"[red]invalid[/red] {error} [dim]({error.code})[/dim]", highlight=False)
        raise UsageError(
            f"--strict: {report.rejected} of {report.total} rows are invalid; nothing enqueued"
        )
    if max_cost is not None and report.estimated_cost_usd > max_cost:
        raise UsageError(
            f"estimated cost ${report.estimated_cost_usd:.2f} is above --max-cost ${max_cost:.2f}"
        )


@contextmanager
def _seekable(manifest: runner.ManifestInput, needed: bool) -> Iterator[runner.ManifestInput]:
    """Spool stdin to a temp file when the manifest must be read twice."""
    if not needed or manifest.stream.seekable():
        yield manifest
        return
    with tempfile.TemporaryFile() as tmp:
        while chunk := manifest.stream.read(1 << 20):
            tmp.write(chunk)
        tmp.seek(0)
        yield runner.ManifestInput(tmp, manifest.fmt, None, manifest.base_dir)


@dataclass(frozen=True)
class JobArgs:
    """The options run, submit and validate share (SPEC: "Common options")."""

    provider: str | None = None
    output: str | None = None
    prompt: str | None = None
    set_items: tuple[str, ...] = ()
    batch_id: str | None = None
    max_cost: float | None = None
    fmt: str | None = None
    strict: bool = False
    force: bool = False


@dataclass(frozen=True)
class Prepared:
    """An opened manifest whose header was read and whole-file checks passed."""

    manifest: runner.ManifestInput
    defaults: RowDefaults
    outcomes: Iterator[RowOutcome]
    batch_id: str


@contextmanager
def _prepare(settings: Settings, manifest_path: str, args: JobArgs) -> Iterator[Prepared]:
    """Everything that can refuse a manifest, before any batch or server exists."""
    batch_id = check_batch_id(args.batch_id) if args.batch_id else new_batch_id()
    root = output_root(args.output or settings.output)
    needs_two_passes = args.strict or args.max_cost is not None
    with (
        runner.open_manifest(manifest_path, args.fmt) as opened,
        _seekable(opened, needs_two_passes) as manifest,
    ):
        defaults = _defaults(settings, args, manifest.base_dir, root, batch_id)
        # Rows already done cost nothing: --max-cost looks them up too.
        skipper = (
            runner.skipper_for(settings, root, force=args.force)
            if args.max_cost is not None
            else None
        )
        _check_manifest(
            settings, manifest, defaults, strict=args.strict, max_cost=args.max_cost,
            skipper=skipper,
        )  # fmt: skip
        runner.probe_destinations(settings, root, batch_id)
        # read_manifest reads the header now: an unreadable file fails here (exit 2).
        outcomes = read_manifest(manifest.stream, manifest.fmt, defaults)
        yield Prepared(manifest, defaults, outcomes, batch_id)


def _enqueue(
    settings: Settings,
    celery_app: Any,
    store: BatchStore,
    prepared: Prepared,
    args: JobArgs,
) -> SubmitReport:
    manifest = prepared.manifest
    reporter = RowReporter()
    with _progress(rows=True) as progress:
        task = progress.add_task("enqueue", total=manifest.size, detail="")
        rows = 0

        def on_row(outcome: RowOutcome) -> None:
            nonlocal rows
            rows += 1
            reporter(outcome)
            if rows % 200 == 0:
                progress.update(task, completed=_position(manifest), detail=f"{rows} rows")

        report = runner.submit_manifest(
            settings,
            celery_app,
            store,
            prepared.outcomes,
            defaults=prepared.defaults,
            output=args.output or settings.output,
            batch_id=prepared.batch_id,
            on_row=on_row,
            force=args.force,
        )
        progress.update(task, completed=manifest.size, detail=f"{report.total} rows")
    reporter.close()
    err.print(
        f"batch [bold]{report.batch_id}[/bold]: {report.valid - report.skipped} rows enqueued, "
        f"{report.skipped} skipped (already done), {report.rejected} rejected, "
        f"estimated cost ${report.estimated_cost_usd:.2f}",
        highlight=False,
    )
    return report


def _defaults(
    settings: Settings, args: JobArgs, base_dir: Path, root: str, batch_id: str
) -> RowDefaults:
    return runner.row_defaults(
        settings,
        provider=args.provider or default_provider(settings),
        prompt=args.prompt,
        set_items=args.set_items,
        base_dir=base_dir,
        root=root,
        batch_id=batch_id,
    )


def _position(manifest: runner.ManifestInput) -> int | None:
    try:
        return manifest.stream.tell() if manifest.size is not None else None
    except OSError:
        return None


def _wait(store: BatchStore, batch_id: str) -> dict[str, str]:
    with _progress() as progress:
        task = progress.add_task("process", total=None, detail="")

        def on_progress(counts: dict[str, int], total: int) -> None:
            done = runner.terminal_count(counts)
            detail = (
                f"ok {counts['succeeded']}  skipped {counts['skipped']}  "
                f"failed {counts['failed']}  running {counts['running']}"
            )
            progress.update(task, total=total or None, completed=done, detail=detail)

        return runner.wait_for_batch(store, batch_id, on_progress)


def _summary(store: BatchStore, batch_id: str, meta: dict[str, str]) -> int:
    if meta.get("status") == "failed":
        err.print(f"[red]batch {batch_id} failed:[/red] {meta.get('error')}", highlight=False,
                  soft_wrap=True)  # fmt: skip
        return 1
    counts = store.counts(batch_id)
    total = int(meta.get("total", 0))
    out_dir = f"{meta['output'].rstrip('/')}/{batch_id}"
    err.print(
        f"[bold]{batch_id}[/bold]: {counts['succeeded']}/{total} succeeded, "
        f"{counts['skipped']} skipped, {counts['failed']} failed, {counts['canceled']} canceled; "
        f"cost ${float(meta.get('cost_usd', 0)):.2f}",
        highlight=False,
    )
    for provider, reason in store.halts(batch_id).items():
        err.print(f"[red]{provider} was stopped for this batch:[/red] {reason}", highlight=False)
    err.print(f"outputs:  {out_dir}/", highlight=False)
    err.print(f"manifest: {meta.get('manifest_url', '(not written)')}", highlight=False)
    return 0 if counts["succeeded"] + counts["skipped"] == total else 1


@app.command()
def run(
    manifest: Annotated[str, typer.Argument(help="manifest file (.csv/.jsonl) or - for stdin")],
    provider: ProviderOpt = None,
    output: OutputOpt = None,
    prompt: PromptOpt = None,
    set_: SetOpt = None,
    batch_id: BatchIdOpt = None,
    max_cost: MaxCostOpt = None,
    format: FormatOpt = None,
    strict: StrictOpt = False,
    force: ForceOpt = False,
    concurrency: Annotated[int | None, typer.Option(help="embedded worker threads")] = None,
) -> None:
    """Process a whole manifest on this machine and exit when every row is terminal."""
    settings = _settings()
    args = JobArgs(
        provider, output, prompt, tuple(set_ or ()), batch_id, max_cost, format, strict, force
    )
    with _prepare(settings, manifest, args) as prepared:
        if settings.broker_url:
            celery_app, store = _connect(settings)
            report = _enqueue(settings, celery_app, store, prepared, args)
            raise typer.Exit(_summary(store, report.batch_id, _wait(store, report.batch_id)))
        raise typer.Exit(_run_embedded(settings, prepared, args, concurrency))


def _run_embedded(
    settings: Settings, prepared: Prepared, args: JobArgs, concurrency: int | None
) -> int:
    # Imported here: the Celery app reads settings when imported, and only the
    # commands that talk to a queue should pay for (or fail on) that.
    from producer.embedded import broker_url_for, inprocess_worker, redis_server  # noqa: PLC0415
    from worker import runtime  # noqa: PLC0415
    from worker.celery_app import apply_config  # noqa: PLC0415

    with redis_server() as redis_url:
        local = settings.model_copy(
            update={
                "broker_url": broker_url_for(redis_url),
                "redis_url": redis_url,
                "worker_concurrency": concurrency or settings.worker_concurrency,
            }
        )
        celery_app, store = _connect(local)
        apply_config(local)
        runtime.configure(local)
        with inprocess_worker(celery_app):
            report = _enqueue(local, celery_app, store, prepared, args)
            code = _summary(store, report.batch_id, _wait(store, report.batch_id))
        store.redis.close()
    return code


def _connect(settings: Settings) -> tuple[Any, BatchStore]:
    import worker.tasks  # noqa: F401, PLC0415 - registers the tasks (see _run_embedded)
    from worker.celery_app import app as celery_app  # noqa: PLC0415

    celery_app.conf.broker_url = settings.effective_broker_url
    return celery_app, BatchStore.from_url(settings.effective_redis_url)


@app.command()
def submit(
    manifest: Annotated[str, typer.Argument(help="manifest file (.csv/.jsonl) or - for stdin")],
    provider: ProviderOpt = None,
    output: OutputOpt = None,
    prompt: PromptOpt = None,
    set_: SetOpt = None,
    batch_id: BatchIdOpt = None,
    max_cost: MaxCostOpt = None,
    format: FormatOpt = None,
    strict: StrictOpt = False,
    force: ForceOpt = False,
    wait: Annotated[bool, typer.Option("--wait", help="wait until every row is terminal")] = False,
) -> None:
    """Validate and enqueue a manifest; print the batch id."""
    settings = _settings()
    celery_app, store = _connect(settings)
    args = JobArgs(
        provider, output, prompt, tuple(set_ or ()), batch_id, max_cost, format, strict, force
    )
    with _prepare(settings, manifest, args) as prepared:
        report = _enqueue(settings, celery_app, store, prepared, args)
    typer.echo(report.batch_id)
    if wait:
        raise typer.Exit(_summary(store, report.batch_id, _wait(store, report.batch_id)))


@app.command()
def validate(
    manifest: Annotated[str, typer.Argument(help="manifest file (.csv/.jsonl) or - for stdin")],
    provider: ProviderOpt = None,
    output: OutputOpt = None,
    prompt: PromptOpt = None,
    set_: SetOpt = None,
    format: FormatOpt = None,
    show_prompts: Annotated[bool, typer.Option(help="print each row's rendered prompt")] = False,
    force: ForceOpt = False,
) -> None:
    """Dry run: validate every row, render prompts, estimate cost; enqueue nothing."""
    settings = _settings()
    root = output_root(output or settings.output)
    with runner.open_manifest(manifest, format) as opened:
        args = JobArgs(provider=provider, prompt=prompt, set_items=tuple(set_ or ()))
        # The batch does not exist: rows without `output` are compared under a stand-in.
        defaults = _defaults(settings, args, opened.base_dir, root, "(batch)")
        reporter = RowReporter()

        def rows() -> Iterator[RowOutcome]:
            for outcome in read_manifest(opened.stream, opened.fmt, defaults):
                reporter(outcome)
                if show_prompts and outcome.spec is not None:
                    typer.echo(json.dumps({"id": outcome.spec.id, "prompt": outcome.spec.prompt}))
                yield outcome

        skipper = runner.skipper_for(settings, root, force=force)
        report = estimate(rows(), runner.provider_cache(settings), skipper)
        reporter.close()
    err.print(
        f"{report.total} rows: {report.valid} valid, {report.rejected} rejected; "
        f"{report.skipped} would be skipped (already done); "
        f"estimated cost of the rest ${report.estimated_cost_usd:.2f}",
        highlight=False,
    )
    raise typer.Exit(0 if report.rejected == 0 else 1)


@app.command()
def status(
    batch: Annotated[str, typer.Argument(help="batch id")],
    watch: Annotated[bool, typer.Option("--watch", help="refresh until the batch is done")] = False,
) -> None:
    """Counts by state, cost so far, rate, ETA."""
    settings = _settings()
    store = BatchStore.from_url(settings.effective_redis_url)
    while True:
        meta, counts = store.meta(batch), store.counts(batch)
        active = counts["running"] + counts["queued"]
        queue = runner.provider_queue(store, batch) if active else None
        err.print(_status_table(batch, meta, counts, queue))
        if not watch or meta.get("status") in ("done", "failed"):
            return
        time.sleep(2)


def _status_table(
    batch: str, meta: dict[str, str], counts: dict[str, int], queue: tuple[int, int] | None
) -> Table:
    total = int(meta.get("total", 0) or 0)
    done = runner.terminal_count(counts)
    created = datetime.fromisoformat(meta["created_at"])
    elapsed = max(1e-3, (datetime.now(UTC) - created).total_seconds())
    rate = done / elapsed
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 and meta.get("status") != "done" else "-"
    table = Table(title=f"batch {batch} ({meta.get('status')})", show_header=False)
    for state in ("queued", "running", *TERMINAL_STATES):
        table.add_row(state, str(counts[state]))
    table.add_row("total", str(total))
    table.add_row("cost", f"${float(meta.get('cost_usd', 0)):.2f}")
    if queue is not None:
        waiting, deepest = queue
        table.add_row("provider queue", f"{waiting} rows waiting (deepest position {deepest})")
    table.add_row("rate", f"{rate:.1f} rows/s")
    table.add_row("eta", eta)
    if meta.get("manifest_url"):
        table.add_row("manifest", meta["manifest_url"])
    return table


@app.command()
def results(
    batch: Annotated[str, typer.Argument(help="batch id")],
    out: Annotated[
        Path | None, typer.Option("-o", "--output", help="file (default: stdout)")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="jsonl | csv")] = "jsonl",
) -> None:
    """Write the output manifest (one line per input row, in input order)."""
    if format not in ("jsonl", "csv"):
        raise UsageError("--format must be jsonl or csv")
    store = BatchStore.from_url(_settings().effective_redis_url)
    lines = manifest_lines(store, batch)
    writer = write_csv if format == "csv" else write_jsonl
    if out is None:
        writer(lines, sys.stdout)
        return
    with out.open("w", encoding="utf-8", newline="") as fh:
        n = writer(lines, fh)
    err.print(f"{n} rows written to {out}")


@app.command()
def retry(batch: Annotated[str, typer.Argument(help="batch id")]) -> None:
    """Re-enqueue the failed rows of a batch (rows rejected by validation stay failed)."""
    settings = _settings()
    celery_app, store = _connect(settings)
    total = int(store.meta(batch).get("total", 0))
    messages = []
    for rec in store.records(batch, total):
        if (
            rec.state == "failed"
            and not rec.job.get("rejected")
            and store.requeue_failed(batch, rec.index)
        ):
            messages.append((f"{batch}:{rec.index}:retry", batch, rec.index))
    runner.celery_publisher(celery_app)(messages)
    err.print(f"{len(messages)} failed rows re-enqueued")


@app.command()
def cancel(batch: Annotated[str, typer.Argument(help="batch id")]) -> None:
    """Stop the rest of a batch: queued rows become canceled, in-flight provider requests
    are canceled where the provider can (fal), and waiting rows stop waiting."""
    settings = _settings()
    celery_app, store = _connect(settings)
    store.meta(batch)  # BatchNotFound (exit 2) for an unknown id
    store.set_meta(batch, canceled="1")  # workers polling a provider see it and stop
    in_flight = runner.cancel_in_flight(settings, store, batch)
    n, complete = 0, False
    canceled = RowCanceled("canceled by `bgswap cancel`")
    for index in list(store.indices_in_state(batch, "queued")):
        result = {"status": "canceled", "outputs": [], "cost_usd": 0.0, "error": canceled.to_dict()}
        verdict = store.finish(batch, index, "canceled", result, allowed_from=("queued",))
        n += verdict.value != "terminal"
        complete = complete or verdict.value == "complete"
    if complete:
        runner.enqueue_finalize(celery_app, batch)
    err.print(f"{n} queued rows canceled; {in_flight} in-flight provider requests canceled")
