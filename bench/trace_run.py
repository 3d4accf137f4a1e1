"""Which of tlx's modules a command runs code in, and where control goes back up the layers.

Runs ``tlx ARGS`` in this process under ``sys.setprofile`` (tlx from PYTHONPATH, so an earlier tree can
be traced too) and prints, as JSON on stderr: the tlx modules whose functions ran, and each distinct
``caller -> callee`` pair of tlx modules where the callee sits in a higher layer than the caller
(docs/architecture.md; an earlier tree's modules are placed where their code now lives). Such a call
is a callback (a hook, the console, the atomic writer's write function), never an import: the import
contracts forbid those. Extraction workers are other processes and are not traced.

    PYTHONPATH=src python bench/trace_run.py run hymenoptera-lite0 --set dataset.root=DIR
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from types import FrameType
from typing import Any

#: the layers, top first; an earlier tree's module names are placed with the code they held
LAYERS = [
    ["__main__"],
    ["cli", "default_plugins"],
    ["api", "run", "finetune", "sweeps", "sweep_jobs", "compare", "predict", "evaluate", "export", "serve"],
    ["artifacts", "tracking", "report", "plots"],
    ["train", "logreg", "stacked", "span", "optim", "folds", "scores"],
    [
        "extraction",
        "backbone",
        "cache",
        "features",
        "runtimes",
        "engines",
        "preprocess",
        "flip",
        "device",
        "weights",
    ],
    ["components", "plugins", "registry", "recipe"],
    ["data", "tensors"],
    ["errors", "files", "notices", "version", "hookspecs"],
]
RANK = {name: n for n, layer in enumerate(LAYERS) for name in layer}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else None


def main() -> None:
    calls: Counter[tuple[str, str]] = Counter()
    seen: set[str] = set()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("tlx"):
            return
        seen.add(module)
        caller = frame.f_back
        while caller is not None and not caller.f_globals.get("__name__", "").startswith("tlx"):
            caller = caller.f_back
        if caller is not None and caller.f_globals["__name__"] != module:
            calls[(caller.f_globals["__name__"], module)] += 1

    sys.setprofile(profile)
    threading.setprofile(profile)
    from tlx.cli import main as tlx

    sys.argv = ["tlx", *sys.argv[1:]]
    try:
        tlx()
    except SystemExit:
        pass
    finally:
        sys.setprofile(None)
    modules = sorted(m for m in seen if m != "tlx")
    up = sorted(
        f"{a} -> {b}"
        for a, b in calls
        if layer(a) is not None and layer(b) is not None and layer(a) > layer(b)  # type: ignore[operator]
    )
    print(
        json.dumps({"modules": len(modules), "upward_calls": up, "list": modules}, indent=1), file=sys.stderr
    )


if __name__ == "__main__":
    main()
