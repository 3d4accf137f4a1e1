"""``tlx sweep``: one run per combination of a grid of recipe keys, ranked on the training split.

Every combination is a normal run folder (:func:`tlx.run.run`) under the sweep folder, named by its
values. The runs are ordered so that each backbone's features are extracted once, by its first
run, and read from the cache by the others. Each run also gets a selection score on the training
split (:func:`tlx.train.selection_score`); the winner is the best selection score, ties going to
the smaller feature dimension (the cheaper backbone to run). The test accuracy is reported and
never used to choose. The sweep folder holds ``leaderboard.csv``, ``leaderboard.md``,
``leaderboard.png`` and ``best`` (a link to the winner's folder, or a file naming it).

Started again with the same folder, a sweep keeps the runs that finished (``metrics.json``) on the
data it lists now (:meth:`tlx.data.Splits.listing`) and runs the rest, a finished run whose files are
damaged or whose data has changed again. The sweep folder is locked while the sweep lives, by its
forked processes too (:func:`tlx.artifacts.run_folder`): a second sweep into it is refused until the
last of them has ended.

The module is ``sweeps`` so that the public function ``tlx.sweep`` is not hidden by a submodule
of the same name once the module is imported.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from tlx import notices
from tlx.components import Components, resolve, with_head_defaults
from tlx.errors import TlxError, describe, shorten
from tlx.extraction.pipeline import can_fork
from tlx.recipe import Recipe, assign, cpu_cores, load_sweep, read_yaml, recipe_from
from tlx.report import Console, QuietConsole
from tlx.runfiles import DataListing, Metrics, read_metrics

if TYPE_CHECKING:
    from tlx.data import Split
    from tlx.extraction.frozen import FrozenBackbone
    from tlx.plots import Painter
    from tlx.scores import Scores

#: the most combinations a sweep runs unless told otherwise
MAX_COMBINATIONS = 64
#: the name in the sweep folder that points to the winner's run folder
BEST = "best"


@dataclass(frozen=True)
class Combination:
    """One point of the grid: its values, its validated recipe and components, its folder name."""

    values: dict[str, Any]
    recipe: Recipe
    parts: Components
    name: str

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={show(value)}" for key, value in self.values.items())


class _Again(Exception):
    """A finished run to run again, and why (one line)."""


@dataclass
class Sweep:
    """A finished sweep: its folder, the leaderboard rows (best first) and the winner's run folder."""

    folder: Path
    rows: list[dict[str, Any]]
    best: Path


def show(value: Any) -> str:
    """A grid value as the user wrote it: plain text, or flow-style YAML for a list or mapping."""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return str(value)


def sweep(
    recipe: str | Path,
    grid: Mapping[str, Sequence[Any]] | None = None,
    overrides: Sequence[str] = (),
    *,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    max_combinations: int = MAX_COMBINATIONS,
    jobs: int | None = None,
    quiet: bool = True,
) -> Sweep:
    """Run every combination of ``grid`` (and the recipe's ``sweep`` section) and rank them; ``recipe`` is
    a file or a bundled recipe's name, as :func:`tlx.fit` takes it.

    ``grid`` maps recipe keys to the values to try (``{"head.type": ["linear", "logreg"]}``);
    ``overrides`` are ``KEY=VALUE`` strings as with ``--set``; ``out`` is the sweep folder (default
    ``sweeps/<timestamp>-<recipe name>``; an existing sweep folder is resumed). ``jobs``: how many
    combinations train at once, one core each (default: one per core; see :func:`_in_parallel`).
    ``quiet`` prints nothing. The whole grid is validated before the first run.
    """
    jobs = cpu_cores() if jobs is None else jobs
    if jobs < 1:
        raise TlxError(f"jobs: {jobs} is not a number of processes; give 1 or more")
    if quiet:
        with notices.collected([]):
            return _sweep(Path(recipe), grid, overrides, out, cache_dir, max_combinations, jobs, quiet=True)
    return _sweep(Path(recipe), grid, overrides, out, cache_dir, max_combinations, jobs, quiet=False)


def _sweep(
    path: Path,
    grid: Mapping[str, Sequence[Any]] | None,
    overrides: Sequence[str],
    out: str | Path | None,
    cache_dir: str | Path | None,
    max_combinations: int,
    jobs: int,
    *,
    quiet: bool,
) -> Sweep:
    from tlx.artifacts import METRICS_FILE, new_run_folder, run_folder

    combinations = plan(path, grid, overrides, max_combinations)
    folder = Path(out) if out is not None else new_run_folder(path, Path("sweeps"))
    _refuse_running(folder, combinations)
    with run_folder(folder, path):
        results: dict[str, Metrics] = {}
        todo, lines = [], []
        listings: dict[str, dict[str, Any]] = {}
        for number, combination in enumerate(combinations, 1):
            prefix = f"[{number}/{len(combinations)}] {combination.label}"
            try:
                done = _finished(folder / combination.name, combination, listings)
            except _Again as why:
                lines.append(f"{prefix}: running it again: {why}")
                done = None
            if done is None:
                todo.append(number)
            else:
                lines.append(f"{prefix}: kept {folder / combination.name}")
                results[combination.name] = done
        for number in todo:  # every finished run is checked: it is no longer one
            (folder / combinations[number - 1].name / METRICS_FILE).unlink(missing_ok=True)
        if not quiet:
            click.echo("".join(f"{line}\n" for line in lines), nl=False)
        return _run_all(path, folder, combinations, todo, results, cache_dir, jobs, quiet=quiet)


def _run_all(
    path: Path,
    folder: Path,
    combinations: list[Combination],
    todo: list[int],
    results: dict[str, Metrics],
    cache_dir: str | Path | None,
    jobs: int,
    *,
    quiet: bool,
) -> Sweep:
    """Run combinations ``todo`` (numbers from 1), rank them with ``results`` (the finished ones), and
    write the leaderboard."""
    cache = Path(cache_dir) if cache_dir is not None else None

    def console(number: int) -> Console:
        return QuietConsole() if quiet else Progress(number, len(combinations), combinations[number - 1])

    def run_one(
        number: int, painter: Painter | None = None, progress: Console | None = None
    ) -> dict[str, Any]:
        return _run(combinations[number - 1], path, folder, cache, painter, progress or console(number))

    parallel = min(jobs, len(todo)) > 1 and can_fork()
    if parallel:
        done = _in_parallel(combinations, todo, jobs, run_one, console, cache)
        results.update(
            {combinations[n - 1].name: Metrics.model_validate(metrics) for n, metrics in done.items()}
        )
    with _painters() as painters:  # started after the last fork: a child must not hold their pipes
        for number in [] if parallel else todo:
            results[combinations[number - 1].name] = Metrics.model_validate(run_one(number, next(painters)))
        rows = leaderboard(combinations, results)
        best = folder / rows[0]["run"]
        write_leaderboard(folder, rows, list(combinations[0].values), next(painters))
    point_best(folder, rows[0]["run"])
    if not quiet:
        click.echo((folder / "leaderboard.md").read_text(encoding="utf-8"), nl=False)
        click.echo(f"winner {rows[0]['run']}: {best}")
    return Sweep(folder, rows, best)


def plan(
    path: Path,
    grid: Mapping[str, Sequence[Any]] | None,
    overrides: Sequence[str],
    max_combinations: int = MAX_COMBINATIONS,
) -> list[Combination]:
    """Every combination, validated and resolved, ordered so that runs sharing a backbone follow each other.

    A bad grid fails here, before any run: an unknown key, an empty list, too many combinations, or
    a value that fails validation (the error names its combination).
    """
    data, set_keys, keys = load_sweep(path, tuple(overrides), {k: list(v) for k, v in (grid or {}).items()})
    if not keys:
        raise TlxError(
            f"{path}: nothing to sweep; give --grid KEY=V1,V2 (e.g. --grid head.type=linear,logreg,mlp) "
            "or a sweep section in the recipe"
        )
    count = math.prod(len(values) for values in keys.values())
    if count > max_combinations:
        sizes = " × ".join(f"{len(v)} {k}" for k, v in keys.items())
        raise TlxError(
            f"the grid has {count} combinations ({sizes}), more than the limit of {max_combinations}; "
            f"shrink it or raise the limit (--max-combinations {count})"
        )
    combinations = []
    names = _names([dict(zip(keys, values)) for values in itertools.product(*keys.values())])
    for name, values in names.items():
        combinations.append(_combination(path, data, set_keys, values, name))
    order = {key: n for n, key in enumerate(dict.fromkeys(map(_backbone_key, combinations)))}
    return sorted(combinations, key=lambda c: order[_backbone_key(c)])


def _combination(
    path: Path, data: dict[str, Any], set_keys: set[str], values: dict[str, Any], name: str
) -> Combination:
    """One combination's recipe, validated and resolved; any error names the combination."""
    label = ", ".join(f"{key}={show(value)}" for key, value in values.items())
    try:
        combined = json.loads(json.dumps(data))  # a deep copy of plain YAML data
        for key, value in values.items():
            assign(combined, key, value, "--grid")
        recipe = recipe_from(combined, str(path), set_keys)
        if recipe.strategy != "features":
            raise TlxError(
                "strategy: finetune trains the backbone anew for every combination, which a sweep "
                "does not do; sweep with strategy: features, then fine-tune the winner with tlx run"
            )
        parts = resolve(recipe, str(path), engine=True)
        recipe = with_head_defaults(recipe, parts)  # each head type trains with its own defaults
    except TlxError as exc:
        raise TlxError(f"sweep combination {label}: {exc}") from None
    return Combination(values, recipe, parts, name)


def _names(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Folder names from the values (``tf_efficientnet_lite0.pypi-logreg``), numbered when two would clash."""
    slugs = [
        "-".join(re.sub(r"[^A-Za-z0-9._=+]+", "_", show(v)).strip("_")[:40] or "_" for v in p.values())
        for p in points
    ]
    if len(set(slugs)) < len(slugs):
        slugs = [f"{n:02d}-{slug}" for n, slug in enumerate(slugs, 1)]
    return dict(zip(slugs, points))


def _backbone_key(combination: Combination) -> str:
    """What decides a combination's features: its backbone and extraction settings."""
    recipe = combination.recipe
    return (
        recipe.backbone.model_dump_json()
        + recipe.extract.model_dump_json()
        + recipe.dataset.model_dump_json()
    )


def _frozen(combination: Combination, cache_dir: Path | None) -> tuple[FrozenBackbone, list[Split]]:
    """The combination's frozen backbone and the splits of its dataset."""
    from tlx.extraction.frozen import FrozenBackbone
    from tlx.extraction.store import cache_dir as default_cache

    recipe, parts = combination.recipe, combination.parts
    splits = parts.dataset.factory(parts.dataset_options)
    return FrozenBackbone.of(recipe, parts, default_cache(cache_dir)), [splits.train, splits.test]


def _cached(combination: Combination, cache_dir: Path | None) -> bool:
    """Whether the features of every image of the combination are cached: its run extracts nothing."""
    frozen, splits = _frozen(combination, cache_dir)
    return frozen.cached(splits)


def _ready(combination: Combination, cache_dir: Path | None) -> None:
    """Ready the combination's backbone for extraction (:meth:`FrozenBackbone.ready`)."""
    frozen, splits = _frozen(combination, cache_dir)
    frozen.ready(splits, engine=combination.parts.engine)


#: runs combination ``number`` (in a forked child: with its painter and console): its metrics
RunOne = Callable[..., dict[str, Any]]
#: what a forked child says: its metrics, its console's ``(echo or warning, line)``, other warnings
Said = tuple[dict[str, Any], list[tuple[str, str]], list[str]]
#: what a forked child of :func:`_in_parallel` does with a combination's number, by name (set before
#: the pool forks: only the name and the number cross to the child)
_child_tasks: dict[str, Callable[[int], Any]] = {}


def _in_parallel(
    combinations: list[Combination],
    numbers: list[int],
    jobs: int,
    run_one: RunOne,
    console: Callable[[int], Console],
    cache: Path | None,
) -> dict[int, dict[str, Any]]:
    """Combinations ``numbers``, ``jobs`` at a time: the metrics of each.

    The first combination of each backbone whose features are not cached runs in this process, which
    extracts them on every core; meanwhile a pool of ``jobs`` processes forked from this one trains
    the combinations whose features are cached, one core each, and readies the later backbones
    (:meth:`FrozenBackbone.ready`: built, exported and probed, so that their runs only recall them;
    an error is left to the run, which reports it). Every number is what one at a time gives: heads
    train on one thread either way, seeded the same. A child's lines and warnings are shown here when
    it is done (its own output may go nowhere: a notebook, a test runner). The children leave Ctrl-C
    and SIGTERM to this process: the first error, or Ctrl-C, ends every child and stops the sweep.
    """
    from tlx.plots import Painter, preload

    extracting: dict[str, int] = {}
    for n in numbers:
        key = _backbone_key(combinations[n - 1])
        if key not in extracting and not _cached(combinations[n - 1], cache):
            extracting[key] = n
    waiting = [n for n in numbers if n not in extracting.values()]
    preload()  # once, here: every child draws its figures itself, matplotlib already imported

    def in_child(number: int) -> Said:
        progress, said, warned = console(number), [], []
        progress.echo = lambda text: said.append(("echo", text))  # type: ignore[method-assign]
        progress.warning = lambda text: said.append(("warning", text))  # type: ignore[method-assign]
        with notices.collected(warned):
            return run_one(number, Painter(inline=True), progress), said, warned

    _child_tasks.update(run=in_child, ready=lambda n: _ready(combinations[n - 1], cache))
    sys.stdout.flush()
    sys.stderr.flush()
    others = multiprocessing.active_children()
    pool = ProcessPoolExecutor(jobs, multiprocessing.get_context("fork"), _start_child)
    results: dict[int, dict[str, Any]] = {}
    running: dict[Future[Said], int] = {}

    def start_ready() -> None:
        for n in [n for n in waiting if _backbone_key(combinations[n - 1]) not in extracting]:
            with _signals_held():  # the pool forks its children on the first submit
                running[pool.submit(_child, "run", n)] = n
            waiting.remove(n)

    try:
        with _signals_held():
            readied = {n: pool.submit(_child, "ready", n) for n in list(extracting.values())[1:]}
        start_ready()
        for key, n in list(extracting.items()):
            if n in readied:
                wait([readied[n]])
            results[n] = run_one(n, Painter(inline=True))
            del extracting[key]
            start_ready()
        for future in as_completed(running):
            number = running[future]
            results[number], said, warned = future.result()
            progress = console(number)
            for kind, text in said:
                getattr(progress, kind)(text)
            for text in warned:
                notices.warn(text)
    except BaseException:
        for child in multiprocessing.active_children():
            if child not in others:
                child.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


#: what the pool's children leave to the sweep's process, which ends them (see :func:`_start_child`)
_HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back, then delivered: a child forked meanwhile starts with them held."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _start_child() -> None:
    """A forked child's start: Ctrl-C ignored and SIGTERM ending it, as the sweep's process stops the
    children itself (a terminal sends Ctrl-C to every process); one torch thread (more could deadlock
    after this process's started)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
    import torch

    torch.set_num_threads(1)


def _child(task: str, number: int) -> Any:
    """Task ``task`` of combination ``number`` in a forked child; an error that cannot cross back to
    this process becomes a RuntimeError."""
    try:
        return _child_tasks[task](number)
    except TlxError:
        raise
    except Exception as exc:
        raise RuntimeError(describe(exc)) from None


def _refuse_running(folder: Path, combinations: list[Combination]) -> None:
    """Refuse a sweep folder that an earlier sweep still holds: itself, or its forked processes that
    outlived it (``kill -9``) and still run combinations."""
    from tlx.artifacts import lock_holder

    holder = lock_holder(folder)
    if holder is None:
        return
    running = (lock_holder(folder / c.name) for c in combinations)
    process = next((pid for pid in running if pid is not None), holder)
    raise TlxError(
        f"--out: a previous sweep is still finishing in {folder} (process {process}); wait for it to "
        "end, or choose another --out"
    )


def _finished(run_dir: Path, combination: Combination, listings: dict[str, dict[str, Any]]) -> Metrics | None:
    """The metrics of a run this sweep finished before; None where it did not finish.

    A run made from another recipe is refused (a TlxError); one with damaged files, or made on data
    other than the combination's dataset lists now, is to run again (:class:`_Again`). ``listings``:
    the datasets' listings, by their options, filled in as they are read.
    """
    from tlx.artifacts import METRICS_FILE, RECIPE_FILE, resolved_recipe

    path = run_dir / METRICS_FILE
    if not path.exists():
        return None
    try:
        ran = read_yaml(run_dir / RECIPE_FILE)
    except TlxError as exc:
        raise _Again(exc) from None
    parts = combination.parts
    wanted = resolved_recipe(combination.recipe, parts.dataset_options, parts.head_options)
    differs = _first_difference(ran, wanted)
    if differs is not None:
        raise TlxError(
            f"--out: {run_dir} ran another recipe ({differs}); choose a new --out for this sweep, "
            "or remove that folder to run it again"
        )
    try:
        metrics = read_metrics(path)
    except TlxError as exc:
        raise _Again(exc) from None
    if metrics.selection is None or metrics.data is None:
        missing = "selection" if metrics.selection is None else "data"
        raise _Again(f"{path}: {missing}: missing; the run did not record it")
    key = json.dumps(wanted["dataset"], sort_keys=True)
    if key not in listings:
        listings[key] = parts.dataset.factory(parts.dataset_options).listing()
    then, now = metrics.data, DataListing.model_validate(listings[key])
    if then != now:
        raise _Again(
            f"the dataset has changed since {run_dir} ran ({then.train.images} training and "
            f"{then.test.images} test images then, {now.train.images} and {now.test.images} now)"
        )
    return metrics


def _first_difference(ran: Any, wanted: Any, key: str = "") -> str | None:
    """The first key where two recipes differ, as ``key: X there, Y now``; None when they agree."""
    if isinstance(ran, dict) and isinstance(wanted, dict):
        for k in dict.fromkeys([*wanted, *ran]):
            found = _first_difference(ran.get(k), wanted.get(k), f"{key}.{k}" if key else str(k))
            if found is not None:
                return found
        return None
    if ran == wanted:
        return None
    return f"{key}: {shorten(show(ran), 60)} there, {shorten(show(wanted), 60)} now"


def _run(
    combination: Combination,
    path: Path,
    folder: Path,
    cache: Path | None,
    painter: Painter | None,
    console: Console,
) -> dict[str, Any]:
    from tlx.artifacts import run_folder
    from tlx.run import run

    with run_folder(folder / combination.name, path) as target:
        tags = {"sweep": folder.name}  # a tracker groups the sweep's runs by it
        return run(combination.recipe, str(path), target, cache, painter, console, select=True, tags=tags)


@contextlib.contextmanager
def _painters() -> Iterator[Iterator[Painter]]:
    """Painters on demand, each started one ahead so that its matplotlib import overlaps a run."""
    from tlx.plots import Painter

    started: list[Painter] = []

    def endless() -> Iterator[Painter]:
        started.append(Painter())
        while True:
            started.append(Painter())
            yield started[-2]

    try:
        yield endless()
    finally:
        for painter in started:
            painter.__exit__()


def leaderboard(combinations: list[Combination], results: dict[str, Metrics]) -> list[dict[str, Any]]:
    """One row per combination, best selection score first; ties go to the smaller feature dimension."""
    rows = []
    for combination in combinations:
        metrics = results[combination.name]
        selection, seconds = metrics.selection, metrics.seconds
        assert selection is not None  # a sweep's runs are selected (run(select=True); resume checks it)
        rows.append(
            {
                **{key: show(value) for key, value in combination.values.items()},
                "selection": selection.mean,
                "selection_std": selection.std,
                "selected_by": selection.selected_by,
                "test_accuracy": metrics.test_accuracy,
                "train_images": metrics.n_train,
                "feature_dim": metrics.feature_dim,
                "extract_s": seconds.extract,
                "train_s": seconds.train,
                "selection_s": selection.seconds,
                "run": combination.name,
            }
        )
    rows.sort(key=lambda r: (-round(r["selection"], 9), r["feature_dim"]))  # stable: grid order last
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
        row["winner"] = rank == 1
    return rows


def write_leaderboard(folder: Path, rows: list[dict[str, Any]], keys: list[str], painter: Painter) -> None:
    """``leaderboard.csv`` (every number), ``leaderboard.md`` (a table to read) and ``leaderboard.png``."""
    from tlx.artifacts import write_rows, write_text
    from tlx.compare import markdown

    header = [
        "rank",
        *keys,
        "selection (mean ± std)",
        "test accuracy",
        "train images",
        "feature dim",
        "extract s",
        "train s",
        "run",
    ]
    table = [
        [
            f"{row['rank']} ★" if row["winner"] else str(row["rank"]),
            *(row[key] for key in keys),
            f"{row['selection']:.2%} ± {row['selection_std']:.2%}",
            f"{row['test_accuracy']:.2%}",
            str(row["train_images"]),
            str(row["feature_dim"]),
            f"{row['extract_s']:.1f}",
            f"{row['train_s']:.1f}",
            row["run"],
        ]
        for row in rows
    ]
    note = (
        f"Ranked by the selection score ({rows[0]['selected_by']}); the test accuracy is shown, never "
        "used to choose. Ties go to the smaller feature dimension. ★ marks the winner.\n\n"
    )
    labels = [", ".join(row[key] for key in keys) for row in rows]
    try:
        write_rows(folder / "leaderboard.csv", rows)
        write_text(folder / "leaderboard.md", note + markdown(header, table))
        painter.draw_leaderboard(folder / "leaderboard.png", labels, rows)
    except OSError as exc:
        raise TlxError(
            f"--out: cannot write the leaderboard in {folder} ({exc.strerror or exc}); free space there"
        ) from None


def point_best(folder: Path, name: str) -> None:
    """``folder/best`` → the winner's run folder: a relative symlink, or a file naming it where links fail."""
    from tlx.artifacts import write_text

    link = folder / BEST
    tmp = folder / f".{BEST}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if link.is_symlink() or link.is_file():
            link.unlink()
        write_text(link, f"{name}\n")


class Progress(Console):
    """A combination's run in two lines: what runs, then its scores; warnings as usual."""

    def __init__(self, number: int, total: int, combination: Combination) -> None:
        self.prefix = f"[{number}/{total}] {combination.label}"

    def data(self, splits: Any, kind: str) -> None:
        self.echo(f"{self.prefix}: {len(splits.train)} training and {len(splits.test)} test images")

    def backbone(self, recipe: Recipe, plugin: str, info: Any, splits: Any) -> None:
        pass

    def device(self, device: Any, configured: str, runtime: str | None = None) -> None:
        pass

    def features(self, names: tuple[str, str], features: tuple[Any, Any], folder: Path) -> None:
        computed = sum(f.computed for f in features)
        if computed:
            self.echo(f"{self.prefix}: computed {computed} features (cached in {folder})")
        skipped = sum(len(f.skipped) for f in features)
        if skipped:
            self.echo(f"{self.prefix}: skipped {skipped} images that cannot be decoded (metrics.json)")

    def training(self, recipe: Recipe, options: Any, closed_form: bool, from_head: Any) -> None:
        pass

    def fitted(self, head: str, rows: int, seconds: float) -> None:
        pass

    def epoch(self, record: Any) -> None:
        pass

    def done(self, metrics: dict[str, Any], scores: Scores, out: Path) -> None:
        selection, seconds = metrics["selection"], metrics["seconds"]
        self.echo(
            f"{self.prefix}: selection {selection['mean']:.2%} ± {selection['std']:.2%}, test "
            f"{metrics['test_accuracy']:.2%}; extract {seconds['extract']:.1f} s, train "
            f"{seconds['train']:.1f} s, selection {selection['seconds']:.1f} s"
        )
