"""The ``tlx`` command line: ``run``, ``sweep``, ``compare``, ``predict``, ``eval``, ``export``, ``serve``,
``recipes``, ``list``.

Parsing and printing only; the work is elsewhere.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from tlx.errors import TlxError
from tlx.version import __version__


class UserError(click.ClickException):
    """A :class:`TlxError` as click shows it: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"tlx: error: {self.format_message()}", err=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a run stops as on Ctrl-C, its cleanup included."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


class Group(click.Group):
    """Turns a :class:`TlxError` into one line and exit code 2, Ctrl-C into 130 and SIGTERM into 143."""

    def invoke(self, ctx: click.Context) -> Any:
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
        try:
            return super().invoke(ctx)
        except TlxError as exc:
            raise UserError(str(exc)) from None
        except KeyboardInterrupt as exc:
            # Leave at once: half-built data loaders would print tracebacks while being collected.
            # Whatever a run writes is written atomically; an empty run folder is removed on the way here.
            terminated = isinstance(exc, Terminated)
            click.echo("tlx: terminated" if terminated else "tlx: interrupted", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


CACHE_DIR = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Feature cache folder (default: $TLX_CACHE_DIR, else the user cache directory).",
)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="tlx")
def cli() -> None:
    """Transfer learning from a YAML recipe: a dataset, a pretrained backbone and a trainable head."""


OVERRIDES = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe key, e.g. train.epochs=5.",
)
RUN_DIR = click.argument("run_dir", type=click.Path(path_type=Path))


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@OVERRIDES
@click.option(
    "--out", type=click.Path(path_type=Path), help="Output folder (default: a new folder under runs/)."
)
@CACHE_DIR
def run(recipe: Path, overrides: tuple[str, ...], out: Path | None, cache_dir: Path | None) -> None:
    """Run RECIPE: extract features once (or read them from the cache), train the head, write metrics.json.

    RECIPE is a YAML file or the name of a bundled recipe (`tlx recipes` lists them).
    """
    from tlx.api import fit

    fit(recipe, overrides, out=out, cache_dir=cache_dir, quiet=False)


@cli.command("audit")
@click.argument("recipe", type=click.Path(path_type=Path))
@OVERRIDES
@click.option(
    "--out", type=click.Path(path_type=Path), help="Audit folder, new or empty (default: under audits/)."
)
@CACHE_DIR
@click.option(
    "--near-threshold",
    type=float,
    help="Cosine similarity of features from which two images are near-duplicates (default 0.85).",
)
def audit_(
    recipe: Path,
    overrides: tuple[str, ...],
    out: Path | None,
    cache_dir: Path | None,
    near_threshold: float | None,
) -> None:
    """Find label issues, duplicates, train/test leakage and outliers in RECIPE's data.

    RECIPE is a YAML file or the name of a bundled recipe (`tlx recipes` lists them).
    """
    from tlx.api import audit

    audit(recipe, overrides, out=out, cache_dir=cache_dir, quiet=False, near_threshold=near_threshold)


@cli.command("sweep")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--grid",
    "grid",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="Values to try for a recipe key, e.g. head.type=linear,logreg,mlp (adds to the recipe's sweep).",
)
@OVERRIDES
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Sweep folder (default: a new folder under sweeps/); an existing one is resumed.",
)
@CACHE_DIR
@click.option(
    "--max-combinations",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Refuse a grid with more combinations than this.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    help="Combinations trained at once, one core each (default: one per core).",
)
def sweep_(
    recipe: Path,
    grid: tuple[str, ...],
    overrides: tuple[str, ...],
    out: Path | None,
    cache_dir: Path | None,
    max_combinations: int,
    jobs: int | None,
) -> None:
    """Run RECIPE once per combination of the grid; rank them on the training split (leaderboard.md).

    RECIPE is a YAML file or the name of a bundled recipe (`tlx recipes` lists them).
    """
    from tlx.recipe import parse_grid
    from tlx.sweeps import sweep

    sweep(
        recipe,
        parse_grid(grid),
        overrides,
        out=out,
        cache_dir=cache_dir,
        max_combinations=max_combinations,
        jobs=jobs,
        quiet=False,
    )


@cli.command("compare")
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per run.")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
def compare_(folders: tuple[Path, ...], as_json: bool, markdown: bool) -> None:
    """Show runs side by side (run or sweep folders): the recipe keys that differ, accuracy, seconds.

    A damaged run is left out with a warning saying why; the others are shown, and the exit code is 2.
    """
    from tlx import compare

    found = compare.compare(list(folders))
    if as_json:
        click.echo(json.dumps(found.rows, indent=2))
    elif found.rows:
        header, table = compare.cells(found.keys, found.rows)
        click.echo((compare.markdown if markdown else compare.aligned)(header, table), nl=False)
    for _, reason in found.damaged:
        click.echo(f"tlx: warning: left out of the comparison: {reason}", err=True)
    if found.damaged:
        total = len(found.rows) + len(found.damaged)
        raise TlxError(
            f"{len(found.damaged)} of {total} runs are damaged (listed above); restore their files, "
            "or compare the others only"
        )


@cli.group()
def cache() -> None:
    """The feature cache: what it holds, and emptying it."""


@cache.command()
@CACHE_DIR
def info(cache_dir: Path | None) -> None:
    """Show the cache folder, its size, and the images cached per backbone."""
    from tlx.extraction import store as feature_cache

    root = feature_cache.cache_dir(cache_dir)
    namespaces, total = feature_cache.summary(root)
    click.echo(f"cache {root}: {_mib(total)}, {sum(n.entries for n in namespaces)} entries")
    for n in namespaces:
        click.echo(f"  {n.backbone:<24} {n.entries:>8} images  {n.chunks:>5} chunks  {_mib(n.bytes):>10}")


@cache.command()
@CACHE_DIR
def clear(cache_dir: Path | None) -> None:
    """Delete every cached feature (the next run recomputes them); only files tlx wrote are removed."""
    from tlx.extraction import store as feature_cache

    root = feature_cache.cache_dir(cache_dir)
    done = feature_cache.clear(root)
    if done.failed:
        path, reason = done.failed[0]
        problem = f"{len(done.failed)} files could not be removed (first: {path}: {reason})"
        if not done.removed:
            raise TlxError(f"cache {root}: nothing was removed: {problem}; check the folder's permissions")
        click.echo(f"tlx: warning: cache: {problem}", err=True)
    click.echo(f"cache {root}: cleared {done.removed} files, {_mib(done.freed)} freed")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@cli.command("predict")
@RUN_DIR
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(min=1), help="Labels per image.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {path, label, probability}.")
@click.option(
    "--engine",
    help="Run backbone and head on this engine (e.g. ray; `tlx list`) and write Parquet to --output.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --engine: a folder of Parquet files (path, label, probability, top_k, known, skipped, …).",
)
@click.option(
    "--no-reject",
    is_flag=True,
    help="Never answer 'unknown' (an image far from every training image gets its best class too).",
)
@click.option(
    "--coverage",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Add each image's prediction set: the classes that hold its true class this often (e.g. 0.9).",
)
@CACHE_DIR
def predict_(
    run_dir: Path,
    paths: tuple[Path, ...],
    top_k: int,
    as_json: bool,
    engine: str | None,
    output: Path | None,
    no_reject: bool,
    coverage: float | None,
    cache_dir: Path | None,
) -> None:
    """Classify images (files or folders) with the classifier trained in RUN_DIR."""
    from tlx.artifacts import load_run
    from tlx.predict import predict, predict_to

    if (engine is None) != (output is None) or (output is not None and as_json):
        raise TlxError("--engine and --output go together, without --json: the engine writes Parquet files")
    if engine is not None and (no_reject or coverage is not None):
        raise TlxError("--no-reject, --coverage: not with --engine (its Parquet files hold known, ood_score)")
    run = load_run(run_dir, cache_dir=cache_dir)
    if engine is not None and output is not None:
        results, skipped = None, predict_to(run, paths, top_k=top_k, engine=engine, output=output)
    else:
        results, skipped = predict(run, paths, top_k=top_k, reject=not no_reject, coverage=coverage)
    for path, reason in skipped:
        click.echo(f"tlx: warning: skipped {path}: {reason}", err=True)
    if results is None:
        click.echo(f"wrote the predictions to {output}")
        return
    if as_json:
        drop = () if top_k > 1 else ("top_k",)
        click.echo(json.dumps([{k: v for k, v in r.items() if k not in drop} for r in results], indent=2))
        return
    for r in results:
        ranked = "\t".join(f"{t['label']} {t['probability']:.2%}" for t in r["top_k"])
        if r.get("known") is False:
            ranked = f"unknown (looks like none of: {', '.join(run.classes)}) [{ranked}]"
        members = f"\tset {{{', '.join(r['prediction_set'])}}}" if "prediction_set" in r else ""
        click.echo(f"{r['path']}\t{ranked}{members}")


@cli.command("eval")
@RUN_DIR
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a dataset.*, extract.* or device key of the run's recipe, e.g. dataset.root=OTHER.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print test_accuracy, per-class scores and confusion as JSON."
)
@click.option(
    "--coverage",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Also measure the prediction sets for this coverage (e.g. 0.9): how often they hold the truth.",
)
@CACHE_DIR
def eval_(
    run_dir: Path, overrides: tuple[str, ...], as_json: bool, coverage: float | None, cache_dir: Path | None
) -> None:
    """Score the classifier of RUN_DIR on a test split, e.g. --set dataset.root=OTHER (same classes)."""
    from tlx import report
    from tlx.artifacts import load_run
    from tlx.evaluate import check_overrides, coverage_of, evaluate

    check_overrides(overrides)
    run = load_run(run_dir, overrides, cache_dir)
    scores, test = evaluate(run)
    sets = {"sets": coverage_of(run, test, coverage)} if coverage is not None else {}
    skipped = [{"path": str(p), "reason": r} for p, r in test.skipped]
    if as_json:  # the keys of metrics.json
        data = {"test_accuracy": scores.accuracy, "n_test": len(test.y), "per_class": scores.per_class()}
        click.echo(json.dumps({**data, "confusion": scores.confusion, "skipped": skipped, **sets}, indent=2))
        return
    for item in skipped:
        click.echo(f"  skipped {item['path']}: {item['reason']}")
    report.print_scores(scores)
    click.echo(f"test accuracy {scores.accuracy:.2%} on {len(test.y)} images")
    if sets:
        found = sets["sets"]
        click.echo(
            f"prediction sets for coverage {coverage:g}: they hold the true class of "
            f"{found['empirical']:.2%} of the images, {found['mean_set_size']:.2f} classes on average"
        )


@cli.command("export")
@RUN_DIR
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "torchscript"]))
@click.option(
    "--output", type=click.Path(path_type=Path), help="Model file (default: RUN_DIR/model.onnx|.pt)."
)
@click.option("--force", is_flag=True, help="Replace an existing --output (never a run folder's own files).")
def export_(run_dir: Path, fmt: str, output: Path | None, force: bool) -> None:
    """Write backbone and head of RUN_DIR as one model: normalized images in, logits out."""
    from tlx.artifacts import load_run
    from tlx.export import SUFFIX, export

    output = output or run_dir / f"model{SUFFIX[fmt]}"
    meta = export(load_run(run_dir), fmt, output, force=force)  # type: ignore[arg-type]
    click.echo(f"wrote {output} (input 'image' N×3×H×W normalized, output 'logits') and {meta}")


#: the largest ``tlx serve --max-upload-mb``: a request body is held in memory
MAX_UPLOAD_MB = 1000.0
#: the packages ``tlx serve`` imports, by module: what to install (``tlx-vision[serve]`` holds them all)
SERVE_PACKAGES = {"starlette": "starlette", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def _upload_mb(ctx: click.Context, param: click.Parameter, text: str) -> float:
    """``--max-upload-mb``: megabytes above 0, at most :data:`MAX_UPLOAD_MB` (not inf, not NaN)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_UPLOAD_MB:  # NaN fails too
        raise TlxError(f"--max-upload-mb {text}: expected megabytes above 0 and at most {MAX_UPLOAD_MB:g}")
    return value


@cli.command("serve")
@RUN_DIR
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free.")
@click.option(
    "--max-upload-mb",
    default="20",
    show_default=True,
    metavar="MB",
    callback=_upload_mb,
    help="Largest request body accepted (413 above).",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="NAME",
    help="Also answer requests addressed to this host name (repeatable; *.domain, or * for any).",
)
def serve_(run_dir: Path, host: str, port: int, max_upload_mb: float, allow_hosts: tuple[str, ...]) -> None:
    """Answer POST /predict with the classifier of RUN_DIR, with a web page at / (Ctrl-C to stop)."""
    try:
        from tlx.serve import is_loopback, serve
    except ImportError as exc:
        package = (exc.name or "").partition(".")[0]
        if package not in SERVE_PACKAGES:
            raise
        needed = SERVE_PACKAGES[package]
        raise TlxError(f"tlx serve needs {needed}: pip install 'tlx-vision[serve]'") from None

    def ready(url: str) -> None:
        click.echo(f"serving {run_dir} at {url} (Ctrl-C to stop)")
        if not is_loopback(host):
            click.echo(f"tlx: warning: listening on {host}: other machines can reach this server", err=True)

    serve(run_dir, host, port, max_upload_mb, allow_hosts, ready)


@cli.command("recipes")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {name, description, path}.")
def recipes_(as_json: bool) -> None:
    """List the recipes bundled with tlx: `tlx run NAME` runs one, `tlx run FILE` a recipe of yours."""
    from tlx.recipe import bundled_recipes

    found = bundled_recipes()
    if as_json:
        rows = [{"name": r.name, "description": r.description, "path": str(r.path)} for r in found]
        click.echo(json.dumps(rows, indent=2))
        return
    for r in found:
        click.echo(f"{r.name:<24} {r.description}")
    if found:
        click.echo(f"(in {found[0].path.parent}; copy one to change it)")


#: what ``tlx list`` shows, in the order of :meth:`tlx.plugins.Plugins.registries`
KINDS = ("backbones", "heads", "datasets", "trackers", "engines")


@cli.group("list", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """Show registered backbones, heads, datasets, trackers and engines, and the installed plugins."""
    if ctx.invoked_subcommand is not None:
        return
    from tlx.plugins import load

    loaded = load()
    listing: dict[str, list[dict[str, Any]]] = {}
    for key, registry in zip(KINDS, loaded.registries()):
        listing[key] = []
        for entry in registry.entries.values():
            item: dict[str, Any] = {
                "name": entry.name,
                "plugin": entry.plugin,
                "description": entry.description,
            }
            if entry.catalog is not None:
                item["count"] = len(list(entry.catalog()))
            listing[key].append(item)
    listing["plugins"] = [
        {"name": p.name, "version": p.version, "error": p.error, "builtin": p.builtin} for p in loaded.plugins
    ]
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    for key in KINDS:
        click.echo(f"{key}:")
        for item in listing[key]:
            name = f"{item['name']} ({item['count']} models)" if "count" in item else item["name"]
            click.echo(f"  {name:<28} {item['plugin']:<24} {item['description']}")
    click.echo("plugins:")
    for p in listing["plugins"]:
        status = f"ERROR {p['error']}" if p["error"] else ("built-in" if p["builtin"] else "ok")
        click.echo(f"  {p['name']:<28} {p['version']:<24} {status}")


@list_.command("backbones")
@click.argument("patterns", nargs=-1)
@click.option(
    "--pretrained", is_flag=True, help="List pretrained weights (resnet18.tv_in1k), each offline or not."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {name, plugin[, offline]}.")
@click.pass_context
def list_backbones(ctx: click.Context, patterns: tuple[str, ...], pretrained: bool, as_json: bool) -> None:
    """Backbone names matching any PATTERN (default all), and their plugins.

    PATTERN takes wildcards as timm.list_models does ('resnet*', '*vit*'). With --pretrained, the
    names with pretrained weights (resnet18.tv_in1k), each offline (its weights on this machine: the
    local hub cache, a plugin's package, a file) or to be downloaded.
    """
    from tlx.plugins import load

    found = load().backbones.search(patterns or "*", pretrained=pretrained)
    if as_json or ctx.parent.params["as_json"]:  # type: ignore[union-attr]
        keys = ("name", "plugin", "offline") if pretrained else ("name", "plugin")
        click.echo(json.dumps([{key: getattr(f, key) for key in keys} for f in found], indent=2))
        return
    if not found:
        shown = " ".join(patterns) or "*"
        hint = "" if set("*?[") & set(shown) else f"; try '*{shown}*'"
        click.echo(f"no backbone matches {shown!r}{hint}", err=True)
        return
    where = {True: "offline", False: "download", None: "unknown"}
    for f in found:
        click.echo(f"{f.name:<40} {f.plugin:<24} {where[f.offline] if pretrained else ''}".rstrip())
    if pretrained:
        here = sum(f.offline is True for f in found)
        click.echo(f"{len(found)} pretrained backbones, {here} offline (weights on this machine)")


def main() -> None:
    try:
        cli()
    finally:
        # The interpreter's exit runs the cyclic garbage collector over everything torch, timm and
        # ONNX Runtime left (over a second); frozen objects are skipped, and the OS frees them anyway.
        gc.freeze()
