"""`bgswap`: the command line (typer + rich). Commands stay thin; see producer/runner.py."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
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

from producer import console, infra, preflight, runner
from producer.batch import SubmitReport, check_batch_id, estimate, new_batch_id, output_root
from producer.interrupts import Interrupted, Interrupts, interrupts
from producer.manifest import RowDefaults, RowOutcome, read_manifest
from producer.skips import Skipper
from producer.summary import StatusReader, batch_fields, failures_by_code, final_summary
from worker.callbacks import CallbackUrlError, check_callback_destination
from worker.errors import BgswapError, ManifestUnreadable, Unreachable, UsageError
from worker.providers import default_provider
from worker.report import manifest_lines, write_csv, write_jsonl
from worker.settings import Settings, load_settings
from worker.state import TERMINAL_STATES, BatchNotFound, BatchStore

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="Swap product-image backgrounds in bulk.",
)
# soft_wrap: a line is one line however long (scripts and logs read them whole).
err = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("bgswap.cli")
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
    bool,
    typer.Option("--strict", help="refuse the whole manifest on any bad row or misspelt column"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as one JSON object")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="run every row, even those already done at --output")
]
CallbackOpt = Annotated[
    str | None,
    typer.Option("--callback-url", help="POST a signed event here when the batch ends"),
]


def main() -> None:
    try:
        try:
            app()
        except infra.INFRA_ERRORS as exc:
            # Redis or the broker went away under a command: name it, not a traceback.
            if _embedded_dirs:
                raise Unreachable(
                    f"the embedded Redis in {_embedded_dirs[-1]} (BGSWAP_STATE_DIR) stopped "
                    f"answering: did the bgswap that ran it end? ({type(exc).__name__})"
                ) from None
            raise infra.describe(exc, load_settings()) from None
    except (UsageError, ManifestUnreadable) as exc:
        _fail(str(exc), 2)
    except BatchNotFound as exc:
        _fail(f"no batch {exc}", 2)
    except Unreachable as exc:
        _fail(str(exc), 3)
    except KeyboardInterrupt:
        # Ctrl-C where no command handles it (validate, submit, status): no traceback.
        err.print("interrupted", highlight=False)
        sys.exit(130)


def _fail(message: str, code: int) -> None:
    # One line, however long: scripts read it (soft_wrap: no wrapping at 80 columns).
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bgswap {metadata.version('bgswap')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="only errors and the final result")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="debug logging of bgswap on stderr")
    ] = False,
) -> None:
    """Swap product-image backgrounds in bulk."""
    if quiet and verbose:
        raise UsageError("-q and -v contradict each other: give one")
    console.configure(quiet=quiet, verbose=verbose)


def _settings() -> Settings:
    return load_settings()


class RowReporter:
    """Prints each rejected row once (up to a limit) while the manifest streams, and each
    column that looks misspelt; keeps the column warnings (--strict, --json)."""

    def __init__(self, *, warn: bool = True) -> None:
        self.shown = 0
        self.hidden = 0
        self.warn = warn  # False: the warnings end up in an error (--strict)
        self.warnings: list[str] = []

    def __call__(self, outcome: RowOutcome) -> None:
        for warning in outcome.warnings:
            self.warnings.append(warning)
            if self.warn and console.state.chatty:
                err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False,
                          soft_wrap=True)  # fmt: skip
        for error in outcome.errors:
            if self.shown < MAX_SHOWN_ERRORS and console.state.chatty:
                err.print(
                    f"[yellow]rejected[/yellow] {escape(str(error))} [dim]({error.code})[/dim]",
                    highlight=False,
                    soft_wrap=True,
                )
                self.shown += 1
            else:
                self.hidden += 1

    def close(self) -> None:
        if self.hidden and console.state.chatty:
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
        disable=not console.state.chatty,
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
    warnings: list[str] = []
    outcomes = read_manifest(manifest.stream, manifest.fmt, defaults)
    report = estimate(
        _noting_warnings(outcomes, warnings), runner.provider_cache(settings), skipper
    )
    manifest.stream.seek(0)
    refusal = preflight.strict_refusal(report.rejected, report.total, warnings)
    if strict and refusal:
        for error in report.errors[:MAX_SHOWN_ERRORS]:
            err.print(f"[red]invalid[/red] {escape(str(error))} [dim]({error.code})[/dim]",
                      highlight=False, soft_wrap=True)  # fmt: skip
        raise UsageError(f"{refusal}; nothing enqueued")
    if max_cost is not None and report.estimated_cost_usd > max_cost:
        raise UsageError(
            f"estimated cost ${report.estimated_cost_usd:.2f} is above --max-cost ${max_cost:.2f}"
        )


def _noting_warnings(outcomes: Iterator[RowOutcome], into: list[str]) -> Iterator[RowOutcome]:
    for outcome in outcomes:
        into.extend(outcome.warnings)
        yield outcome


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
    """The options run, submit and validate share (README: "Options of run/submit/validate")."""

    provider: str | None = None
    output: str | None = None
    prompt: str | None = None
    set_items: tuple[str, ...] = ()
    batch_id: str | None = None
    max_cost: float | None = None
    fmt: str | None = None
    strict: bool = False
    force: bool = False
    callback_url: str | None = None


@dataclass(frozen=True)
class Prepared:
    """An opened manifest whose header was read and whole-file checks passed."""

    manifest: runner.ManifestInput
    defaults: RowDefaults
    outcomes: Iterator[RowOutcome]
    batch_id: str
    source: dict[str, str]  # the manifest's path, format and sha256 (see runner)
    root: str  # where the batch writes (from output_root)

    @property
    def sha256(self) -> str | None:
        return self.source.get("manifest_sha256")


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
        log.debug("batch %s: %s manifest %s, provider %s, output %s", batch_id, manifest.fmt,
                  manifest_path, defaults.provider, root)  # fmt: skip
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
        source = runner.manifest_source(manifest_path, manifest.fmt)
        yield Prepared(manifest, defaults, outcomes, batch_id, source, root)


def _enqueue(
    settings: Settings,
    celery_app: Any,
    store: BatchStore,
    prepared: Prepared,
    args: JobArgs,
    stop: Interrupts | None = None,
    resume_from: int | None = None,
) -> SubmitReport:
    infra.check_reachable(settings, celery_app, store)  # exit 3 before a batch exists
    manifest = prepared.manifest
    reporter = RowReporter()
    with _progress(rows=True) as progress:
        task = progress.add_task("enqueue", total=manifest.size, detail="")
        rows = 0

        def on_row(outcome: RowOutcome) -> None:
            nonlocal rows
            if stop is not None:
                stop.check()  # between rows: the chunk so far is simply not recorded
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
            output=prepared.root,
            batch_id=prepared.batch_id,
            on_row=on_row,
            source=prepared.source,
            resume_from=resume_from,
            force=args.force,
            callback_url=args.callback_url,
        )
        progress.update(task, completed=manifest.size, detail=f"{report.total} rows")
    reporter.close()
    if console.state.chatty:
        err.print(
            f"batch [bold]{report.batch_id}[/bold]: {report.valid - report.skipped} rows "
            f"enqueued, {report.skipped} skipped (already done), {report.rejected} rejected, "
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


def _wait(store: BatchStore, batch_id: str, stop: Interrupts | None = None) -> dict[str, str]:
    """Progress until the batch's output manifest is written: rows done, rows/s (over
    the last seconds), provider, cost so far."""
    with _progress() as progress:
        task = progress.add_task("process", total=None, detail="")
        window: deque[tuple[float, int]] = deque(maxlen=40)  # 10 s of 0.25 s polls

        def on_progress(counts: dict[str, int], total: int) -> None:
            if stop is not None:
                stop.check()
            done = runner.terminal_count(counts)
            window.append((time.monotonic(), done))
            (t0, d0), (t1, d1) = window[0], window[-1]
            rate = (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0
            meta = store.meta(batch_id)
            detail = (
                f"{meta.get('provider', '?')}  ok {counts['succeeded']}  "
                f"skipped {counts['skipped']}  failed {counts['failed']}  "
                f"running {counts['running']}  {rate:.1f} rows/s  "
                f"${float(meta.get('cost_usd', 0)):.2f}"
            )
            progress.update(task, total=total or None, completed=done, detail=detail)

        return runner.wait_for_batch(store, batch_id, on_progress)


def _summary(store: BatchStore, batch_id: str, meta: dict[str, str]) -> int:
    """The end of a run: counts, failures by code, where things are (stderr); with
    --json, the same as one object on stdout."""
    if console.state.json:
        console.print_json(final_summary(store, batch_id, meta))
    if meta.get("status") == "failed":
        err.print(f"[red]batch {batch_id} failed:[/red] {meta.get('error')}", highlight=False,
                  soft_wrap=True)  # fmt: skip
        return 1
    counts = store.counts(batch_id)
    total = int(meta.get("total", 0))
    out_dir = f"{meta['output'].rstrip('/')}/{batch_id}"
    err.print(
        f"[bold]{batch_id}[/bold]: {counts['succeeded']}/{total} succeeded, "
        f"{counts['skipped']} skipped, {counts['failed']} failed, "
        f"{counts['canceled']} canceled; cost ${float(meta.get('cost_usd', 0)):.2f}",
        highlight=False,
    )
    if counts["failed"]:
        codes = ", ".join(f"{c} {n}" for c, n in failures_by_code(store, batch_id).items())
        err.print(f"failed by code: {codes}", highlight=False, soft_wrap=True)
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
    as_json: Annotated[bool, typer.Option("--json", help="the final summary as JSON")] = False,
) -> None:
    """Process a whole manifest on this machine and exit when every row is terminal.
    With --batch-id of a batch that exists (made from the same file), continue it."""
    console.state.json = as_json
    settings = _settings()
    args = JobArgs(
        provider, output, prompt, tuple(set_ or ()), batch_id, max_cost, format, strict, force
    )
    with (
        interrupts() as stop,
        _prepare(settings, manifest, args) as prepared,
        _backend(settings, runs_rows=True) as backend,
    ):
        raise typer.Exit(_drive(backend, prepared.batch_id, stop, concurrency, prepared, args))


@app.command()
def resume(
    batch: Annotated[str, typer.Argument(help="batch id")],
    concurrency: Annotated[int | None, typer.Option(help="embedded worker threads")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the final summary as JSON")] = False,
) -> None:
    """Continue an interrupted batch: terminal rows are kept, rows with a saved provider
    task are polled (not paid again), the rest run."""
    console.state.json = as_json
    settings = _settings()
    with interrupts() as stop, _backend(settings, runs_rows=True) as backend:
        backend.store.meta(batch)  # BatchNotFound (exit 2) before any worker starts
        raise typer.Exit(_drive(backend, batch, stop, concurrency))


@dataclass(frozen=True)
class Backend:
    """Where batches live: a configured broker's Redis, or the embedded durable one."""

    settings: Settings  # with the embedded server's URLs, when embedded
    celery_app: Any
    store: BatchStore
    embedded: bool
    owner: bool = False  # embedded, and this process runs the server: no worker runs


@contextmanager
def _backend(settings: Settings, *, runs_rows: bool) -> Iterator[Backend]:
    """BGSWAP_BROKER_URL or BGSWAP_REDIS_URL set: that Redis. Neither: the embedded
    default's server on the state directory, started now if no other bgswap runs it.
    ``runs_rows``: this command runs an in-process worker, so it must own the server (see
    producer/embedded.py)."""
    if settings.broker_url or settings.redis_url:
        celery_app, store = _connect(settings)
        yield Backend(settings, celery_app, store, embedded=False)
        return
    # Imported here: the Celery app reads settings when imported, and only the
    # commands that talk to a queue should pay for (or fail on) that.
    from producer.embedded import (  # noqa: PLC0415
        broker_url_for,
        durable_redis,
        reset_owned,
        state_dir_for,
    )

    with durable_redis(state_dir_for(settings.state_dir), need_owner=runs_rows) as server:
        _embedded_dirs.append(server.state_dir)
        local = settings.model_copy(
            update={"broker_url": broker_url_for(server.url), "redis_url": server.url}
        )
        celery_app, store = _connect(local)
        if server.owner:
            from worker.celery_app import QUEUE  # noqa: PLC0415

            when = _now()
            reset_owned(store.redis, QUEUE, store.live_batches(), lambda b: store.pause(b, when))
        try:
            yield Backend(local, celery_app, store, embedded=True, owner=server.owner)
        finally:
            store.redis.close()


# The embedded servers this process uses (for the one-line error if one goes away).
_embedded_dirs: list[Path] = []


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextmanager
def _rows_worker(backend: Backend, concurrency: int | None) -> Iterator[None]:
    """The embedded default's in-process worker (remote workers need nothing here)."""
    if not backend.embedded:
        yield
        return
    from producer.embedded import inprocess_worker  # noqa: PLC0415
    from worker import runtime  # noqa: PLC0415
    from worker.celery_app import apply_config  # noqa: PLC0415

    local = backend.settings
    if concurrency:
        local = local.model_copy(update={"worker_concurrency": concurrency})
    apply_config(local)
    runtime.configure(local)
    with inprocess_worker(backend.celery_app):
        yield


def _drive(
    backend: Backend,
    batch_id: str,
    stop: Interrupts,
    concurrency: int | None,
    prepared: Prepared | None = None,
    args: JobArgs | None = None,
) -> int:
    """Run a batch to its end on this backend: a new one from ``prepared``, or one that
    exists (interrupted, or being continued by `run --batch-id`)."""
    store = backend.store
    exists = store.exists(batch_id)
    if exists and prepared is not None:
        _same_manifest(batch_id, store.meta(batch_id), prepared)
    try:
        with _rows_worker(backend, concurrency):
            if exists or prepared is None:
                meta = store.meta(batch_id)
                if meta.get("status") in ("done", "failed"):
                    err.print(f"batch {batch_id} has ended already", highlight=False)
                    return _summary(store, batch_id, meta)
                _continue(backend, batch_id, meta, stop, prepared)
            else:
                _enqueue(backend.settings, backend.celery_app, store, prepared,
                         args or JobArgs(), stop)  # fmt: skip
            return _summary(store, batch_id, _wait(store, batch_id, stop))
    except Interrupted as exc:
        return _interrupted(backend, batch_id, exc)


def _continue(
    backend: Backend,
    batch_id: str,
    meta: dict[str, str],
    stop: Interrupts,
    prepared: Prepared | None,
) -> None:
    """Pick an existing batch up where it stopped."""
    store = backend.store
    store.revive(batch_id)
    taken = store.take_back(batch_id) if backend.embedded else 0
    queued = runner.republish_queued(backend.celery_app, store, batch_id)
    done = runner.terminal_count(store.counts(batch_id))
    taken_note = f" ({taken} taken back from an ended run)" if taken else ""
    err.print(
        f"resuming batch [bold]{batch_id}[/bold]: {done} rows done, {queued} to run{taken_note}",
        highlight=False,
    )
    if meta.get("status") == "submitting":  # the manifest was not read to its end
        args = JobArgs(force=meta.get("force") == "1")  # the batch keeps its --force
        with _reopen(backend.settings, batch_id, meta, prepared) as reopened:
            _enqueue(backend.settings, backend.celery_app, store, reopened, args, stop,
                     resume_from=store.recorded(batch_id))  # fmt: skip
    elif meta.get("status") == "finalizing":
        runner.enqueue_finalize(backend.celery_app, batch_id)


def _same_manifest(batch_id: str, meta: dict[str, str], prepared: Prepared) -> None:
    if not meta.get("manifest_sha256") or meta.get("manifest_sha256") != prepared.sha256:
        raise UsageError(
            f"batch {batch_id} exists and was made from another manifest: choose another "
            f"--batch-id, or `bgswap resume {batch_id}`"
        )
    if meta.get("output") != prepared.root:
        raise UsageError(
            f"batch {batch_id} exists and writes to {meta.get('output')}, "
            f"not {prepared.root}: choose another --batch-id"
        )


@contextmanager
def _reopen(
    settings: Settings, batch_id: str, meta: dict[str, str], prepared: Prepared | None
) -> Iterator[Prepared]:
    """The manifest of a batch whose submission was cut short, to enqueue the rest."""
    if prepared is not None:
        yield prepared
        return
    path = meta.get("manifest", "-")
    if (
        path == "-"
        or not Path(path).is_file()
        or runner.file_sha256(path) != meta.get("manifest_sha256")
    ):
        raise UsageError(
            f"batch {batch_id} was interrupted while its manifest was read, and "
            f"{'standard input' if path == '-' else path} cannot be read again as it was: "
            f"run `bgswap run MANIFEST --batch-id {batch_id}` with the same file"
        )
    options = json.loads(meta.get("options") or "{}")
    args = JobArgs(
        provider=meta.get("provider"),
        output=meta["output"],
        prompt=options.get("prompt"),
        set_items=tuple(f"{k}={v}" for k, v in (options.get("set") or {}).items()),
        batch_id=batch_id,
        fmt=meta.get("format"),
        force=meta.get("force") == "1",
    )
    with _prepare(settings, path, args) as reopened:
        yield reopened


def _interrupted(backend: Backend, batch_id: str, exc: Interrupted) -> int:
    """After the worker handed its rows back: the partial manifest and one line."""
    store = backend.store
    if not store.exists(batch_id):
        err.print("interrupted before the batch was created: nothing to resume")
        return exc.exit_code
    if backend.embedded:
        store.pause(batch_id, _now())
    try:
        where = runner.write_partial_manifest(backend.settings, store, batch_id)
    except BgswapError as error:
        where = f"(not written: {error.message})"
    counts = store.counts(batch_id)
    goes_on = "" if backend.embedded else "; the workers go on with what was enqueued"
    err.print(
        f"interrupted: {runner.terminal_count(counts)} rows done, partial manifest {where}"
        f"{goes_on}; resume with: bgswap resume {batch_id}",
        highlight=False,
        soft_wrap=True,
    )
    return exc.exit_code


def _connect(settings: Settings) -> tuple[Any, BatchStore]:
    import worker.tasks  # noqa: F401, PLC0415 - registers the tasks (see _backend)
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
    callback_url: CallbackOpt = None,
) -> None:
    """Validate and enqueue a manifest; print the batch id."""
    settings = _settings()
    if callback_url is not None:
        try:
            check_callback_destination(callback_url, settings.allow_private_urls)
        except CallbackUrlError as exc:
            raise UsageError(f"--callback-url: {exc}") from None
    celery_app, store = _connect(settings)
    args = JobArgs(
        provider, output, prompt, tuple(set_ or ()), batch_id, max_cost, format, strict, force,
        callback_url,
    )  # fmt: skip
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
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Dry run: validate every row, render prompts, estimate cost; enqueue nothing."""
    settings = _settings()
    console.state.json = as_json
    root = output_root(output or settings.output)
    prompts: list[dict[str, str]] = []
    with runner.open_manifest(manifest, format) as opened:
        args = JobArgs(provider=provider, prompt=prompt, set_items=tuple(set_ or ()))
        # The batch does not exist: rows without `output` are compared under a stand-in.
        defaults = _defaults(settings, args, opened.base_dir, root, "(batch)")
        reporter = RowReporter(warn=not strict)

        def rows() -> Iterator[RowOutcome]:
            for outcome in read_manifest(opened.stream, opened.fmt, defaults):
                reporter(outcome)
                if show_prompts and outcome.spec is not None:
                    shown = {"id": outcome.spec.id, "prompt": outcome.spec.prompt}
                    if as_json:
                        prompts.append(shown)
                    else:
                        typer.echo(json.dumps(shown))
                yield outcome

        skipper = runner.skipper_for(settings, root, force=force)
        report = estimate(rows(), runner.provider_cache(settings), skipper)
        reporter.close()
    raise typer.Exit(_validate_verdict(report, reporter.warnings, prompts, strict=strict))


def _validate_verdict(
    report: SubmitReport, warnings: list[str], prompts: list[dict[str, str]], *, strict: bool
) -> int:
    """Print validate's result; its exit code: 0 all valid, 1 some rejected, and with
    --strict a refusal (exit 2) for any bad row or misspelt column."""
    if console.state.json:
        result = validation_json(report, warnings)
        if prompts:
            result["prompts"] = prompts
        console.print_json(result)
    else:
        err.print(
            f"{report.total} rows: {report.valid} valid, {report.rejected} rejected; "
            f"{report.skipped} would be skipped (already done); "
            f"estimated cost of the rest ${report.estimated_cost_usd:.2f}",
            highlight=False,
            soft_wrap=True,
        )
    refusal = preflight.strict_refusal(report.rejected, report.total, warnings)
    if strict and refusal:
        raise UsageError(refusal)
    return 0 if report.rejected == 0 else 1


def validation_json(report: SubmitReport, warnings: list[str]) -> dict[str, Any]:
    """``validate --json``: the counts, the cost estimate and every row error."""
    return {
        "total": report.total,
        "valid": report.valid,
        "rejected": report.rejected,
        "skipped": report.skipped,
        "estimated_cost_usd": round(report.estimated_cost_usd, 6),
        "errors": [
            {"line": e.line, "column": e.column, "code": e.code, "message": e.reason}
            for e in report.errors
        ],
        "warnings": warnings,
    }


@app.command()
def status(
    batch: Annotated[str, typer.Argument(help="batch id")],
    watch: Annotated[bool, typer.Option("--watch", help="refresh until the batch is done")] = False,
    as_json: JsonOpt = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="seconds between refreshes (--watch)")
    ] = 2.0,
) -> None:
    """Counts by state, cost so far, rate, ETA, failures by error code."""
    console.state.json = as_json
    with _backend(_settings(), runs_rows=False) as backend:
        _show_status(StatusReader(backend.store, batch), as_json, watch, interval)


def _show_status(reader: StatusReader, as_json: bool, watch: bool, interval: float) -> None:
    if as_json:
        # --watch: one line per refresh (JSON Lines), the last one when the batch is done.
        for fields in reader.follow(interval) if watch else [reader.read()]:
            console.print_json(fields)
    elif not watch:
        err.print(_status_view(reader.read()))
    elif err.is_terminal:
        with Live(console=err, auto_refresh=False) as live:
            for fields in reader.follow(interval):
                live.update(_status_view(fields), refresh=True)
    else:
        # Not a terminal (a log, a pipe): no redrawing, one table when the batch is done.
        last: dict[str, Any] = {}
        for fields in reader.follow(interval):
            last = fields
        err.print(_status_view(last))


def _status_view(fields: dict[str, Any]) -> RenderableType:
    table = Table(title=f"batch {fields['batch_id']} ({fields['state']})", show_header=False)
    counts = fields["counts"]
    for state in ("queued", "running", *TERMINAL_STATES):
        table.add_row(state, str(counts[state]))
    table.add_row("total", str(counts["total"]))
    table.add_row("cost", f"${fields['cost_usd']:.2f}")
    if fields["provider_queue"] is not None:
        queue = fields["provider_queue"]
        table.add_row(
            "provider queue",
            f"{queue['waiting']} rows waiting (deepest position {queue['deepest_position']})",
        )
    table.add_row("rate", f"{fields['rate_rows_per_s']:.1f} rows/s")
    table.add_row("eta", "-" if fields["eta_s"] is None else f"{fields['eta_s']:.0f}s")
    if fields["manifest_url"]:
        table.add_row("manifest", fields["manifest_url"])
    if fields["error"]:
        table.add_row("error", fields["error"])
    if not fields["errors_by_code"]:
        return table
    failures = Table(title="failures by code", show_header=True)
    failures.add_column("code")
    failures.add_column("count", justify="right")
    for code, n in fields["errors_by_code"].items():
        failures.add_row(code, str(n))
    return Group(table, failures)


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
    with _backend(_settings(), runs_rows=False) as backend:
        lines = manifest_lines(backend.store, batch)
        writer = write_csv if format == "csv" else write_jsonl
        if out is None:
            writer(lines, sys.stdout)
            return
        with out.open("w", encoding="utf-8", newline="") as fh:
            n = writer(lines, fh)
    err.print(f"{n} rows written to {out}")


@app.command()
def retry(batch: Annotated[str, typer.Argument(help="batch id")]) -> None:
    """Re-enqueue the failed rows of a batch (rows rejected by validation stay failed).
    On the embedded default with no run going on, run them now."""
    with interrupts() as stop, _backend(_settings(), runs_rows=False) as backend:
        indices = runner.requeue_failed(backend.store, batch)
        err.print(f"{len(indices)} failed rows re-enqueued")
        if backend.owner:  # nobody else would run them: this command does
            raise typer.Exit(_drive(backend, batch, stop, None) if indices else 0)
        runner.publish_retries(backend.celery_app, batch, indices)


@app.command()
def cancel(batch: Annotated[str, typer.Argument(help="batch id")]) -> None:
    """Stop the rest of a batch: queued rows become canceled, in-flight provider requests
    are canceled where the provider can (fal), and waiting rows stop waiting."""
    with _backend(_settings(), runs_rows=False) as backend:
        settings = backend.settings
        outcome = runner.cancel_batch(settings, backend.store, batch, take_back=backend.owner)
        if outcome.complete and backend.owner:
            runner.finalize_here(settings, batch)
        elif outcome.complete:
            runner.enqueue_finalize(backend.celery_app, batch)
    err.print(
        f"{outcome.canceled} queued rows canceled; "
        f"{outcome.in_flight} in-flight provider requests canceled"
    )


@app.command()
def batches(
    limit: Annotated[int, typer.Option("--limit", help="how many, newest first")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per batch")] = False,
) -> None:
    """Recent batches with their state, counts and cost."""
    with _backend(_settings(), runs_rows=False) as backend:
        summaries = [batch_fields(backend.store, b) for b in backend.store.batch_ids(limit)]
    if as_json:
        for summary in summaries:
            typer.echo(json.dumps(summary))
        return
    table = Table(box=None, pad_edge=False)
    for name in ("batch", "state", "done", "failed", "skipped", "cost", "created"):
        table.add_column(name, no_wrap=True)
    for b in summaries:
        c = b["counts"]
        done = c["succeeded"] + c["skipped"] + c["failed"] + c["canceled"]
        table.add_row(
            b["batch_id"], b["state"], f"{done}/{c['total']}", str(c["failed"]),
            str(c["skipped"]), f"${b['cost_usd']:.2f}",
            (b["created_at"] or "")[:16].replace("T", " "),
        )  # fmt: skip
    # Not a terminal: no 80-column squeeze (rich's default), scripts read whole ids.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@app.command()
def schedules(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per schedule")] = False,
) -> None:
    """The schedules of BGSWAP_SCHEDULES: next run, last batch and its state, last skip."""
    from producer.scheduler import describe  # noqa: PLC0415

    settings = _settings()
    if settings.schedules is None:
        raise UsageError("BGSWAP_SCHEDULES is not set: give the schedule file beat reads")
    with _backend(settings, runs_rows=False) as backend:
        rows = describe(backend.settings, backend.store, str(settings.schedules))
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = Table(box=None, pad_edge=False)
    for name in ("schedule", "kind", "when", "timezone", "next run", "last batch", "state",
                 "last skip"):  # fmt: skip
        table.add_column(name, no_wrap=True)
    for r in rows:
        n = r["every_s"] or 0
        when = r["cron"] or (f"every {n // 60}m" if n % 60 == 0 else f"every {n}s")
        table.add_row(
            r["name"], r["kind"], when, r["timezone"], r["next_run"][:19].replace("T", " "),
            r["last_batch"] or "-", r["last_batch_state"] or "-", r["last_skip_reason"] or "-",
        )  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@app.command()
def health(
    this_host: Annotated[
        bool, typer.Option("--this-host", help="also need a fresh worker heartbeat from this host")
    ] = False,
    require_workers: Annotated[
        bool, typer.Option("--require-workers", help="also need a fresh heartbeat of any worker")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Do Redis and the broker answer, and which workers are alive? Exit 0 or 3."""
    from producer.health import gather, verdict  # noqa: PLC0415
    from producer.health import this_host as hostname  # noqa: PLC0415

    settings = _settings()
    if not (settings.broker_url or settings.redis_url):
        raise UsageError(
            "bgswap health checks a deployment: set BGSWAP_BROKER_URL (and BGSWAP_REDIS_URL "
            "when the broker is not Redis)"
        )
    from worker.celery_app import app as celery_app  # noqa: PLC0415

    report = gather(settings, celery_app)
    problems = verdict(report, require_workers=require_workers,
                       host=hostname() if this_host else None)  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report.to_dict(problems)))
    else:
        _print_health(report, problems)
    raise typer.Exit(3 if problems else 0)


def _print_health(report: Any, problems: list[str]) -> None:
    out = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    out.print(f"redis: {'ok' if report.redis is None else report.redis}")
    depth = "" if report.queue_depth is None else f" ({report.queue_depth} messages queued)"
    out.print(f"broker: {'ok' if report.broker is None else report.broker}{depth}")
    fresh = report.fresh()
    out.print(f"workers: {len(fresh)} with a heartbeat in the last {report.fresh_s:.0f}s")
    for w in report.workers[:20]:
        mark = "" if w.age_s <= report.fresh_s else " (stale)"
        out.print(f"  {w.host} pid {w.pid}: {w.age_s:.0f}s ago{mark}")
    for problem in problems:
        err.print(f"[red]unhealthy:[/red] {problem}", highlight=False)


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port")] = 8000,
) -> None:
    """Serve the HTTP API (producer/api.py) over the configured broker's batches."""
    settings = _settings()
    if not settings.broker_url:
        raise UsageError(
            "bgswap serve needs BGSWAP_BROKER_URL: the API enqueues rows for workers "
            "that run elsewhere (celery -A worker worker)"
        )
    if not settings.api_token_list:
        err.print("[yellow]warning:[/yellow] BGSWAP_API_TOKENS is not set: every /v1/batches "
                  "call will be refused (401)", highlight=False)  # fmt: skip
    import uvicorn  # noqa: PLC0415 - only this command serves

    from producer.api import create_app  # noqa: PLC0415
    from worker import logs, metrics  # noqa: PLC0415
    from worker.tasks import scrape_collector  # noqa: PLC0415

    logs.configure(settings.log_format)
    if settings.metrics_port is not None:
        import redis  # noqa: PLC0415

        # The same figures a worker's scrape reads, from the servers the API submits to.
        client = redis.Redis.from_url(settings.effective_redis_url, socket_timeout=3.0)
        if not metrics.serve(
            settings.metrics_host, settings.metrics_port, scrape_collector(settings, client)
        ):
            log.warning("BGSWAP_METRICS_PORT %d is taken: another process serves these "
                        "metrics", settings.metrics_port)  # fmt: skip
    # The access log names method, path and status: never a header (the bearer token).
    # log_config=None: uvicorn's loggers go through the handler configured above.
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", log_config=None)
