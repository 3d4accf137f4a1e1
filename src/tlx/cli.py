"""The ``tlx`` command line: ``tlx run RECIPE`` and ``tlx list``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from tlx import __version__
from tlx.errors import TlxError


class UserError(click.ClickException):
    """A :class:`TlxError` as click shows it: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"tlx: error: {self.format_message()}", err=True)


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TlxError as exc:
            raise UserError(str(exc)) from None
        except KeyboardInterrupt:
            # Leave at once: half-built data loaders would print tracebacks while being collected.
            # Whatever a run writes is written atomically, so nothing needs cleaning up.
            click.echo("tlx: interrupted", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)


CACHE_DIR = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Feature cache folder (default: $TLX_CACHE_DIR, else the user cache directory).",
)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="tlx")
def cli() -> None:
    """Transfer learning from a YAML recipe: a dataset, a pretrained backbone and a trainable head."""


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe key, e.g. train.epochs=5.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), help="Output folder (default: a new folder under runs/)."
)
@CACHE_DIR
def run(recipe: Path, overrides: tuple[str, ...], out: Path | None, cache_dir: Path | None) -> None:
    """Run RECIPE: extract features once (or read them from the cache), train the head, write metrics.json."""
    from tlx.recipe import load_recipe
    from tlx.run import default_out_dir
    from tlx.run import run as run_recipe

    loaded = load_recipe(recipe, overrides)
    run_recipe(loaded, str(recipe), out or default_out_dir(recipe), cache_dir)


@cli.group()
def cache() -> None:
    """The feature cache: what it holds, and emptying it."""


@cache.command()
@CACHE_DIR
def info(cache_dir: Path | None) -> None:
    """Show the cache folder, its size, and the images cached per backbone."""
    from tlx import cache as feature_cache

    root = feature_cache.cache_dir(cache_dir)
    namespaces, total = feature_cache.summary(root)
    click.echo(f"cache {root}: {_mib(total)}, {sum(n.entries for n in namespaces)} entries")
    for n in namespaces:
        click.echo(f"  {n.backbone:<24} {n.entries:>8} images  {n.chunks:>5} chunks  {_mib(n.bytes):>10}")


@cache.command()
@CACHE_DIR
def clear(cache_dir: Path | None) -> None:
    """Delete every cached feature (the next run recomputes them)."""
    from tlx import cache as feature_cache

    root = feature_cache.cache_dir(cache_dir)
    click.echo(f"cache {root}: cleared, {_mib(feature_cache.clear(root))} freed")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def list_(as_json: bool) -> None:
    """Show registered backbones, heads and datasets, and the installed plugins."""
    from tlx.plugins import load

    loaded = load()
    listing: dict[str, list[dict[str, Any]]] = {}
    for key, registry in zip(("backbones", "heads", "datasets"), loaded.registries()):
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
    for key in ("backbones", "heads", "datasets"):
        click.echo(f"{key}:")
        for item in listing[key]:
            name = f"{item['name']} ({item['count']} models)" if "count" in item else item["name"]
            click.echo(f"  {name:<28} {item['plugin']:<24} {item['description']}")
    click.echo("plugins:")
    for p in listing["plugins"]:
        status = f"ERROR {p['error']}" if p["error"] else ("built-in" if p["builtin"] else "ok")
        click.echo(f"  {p['name']:<28} {p['version']:<24} {status}")


def main() -> None:
    cli()
