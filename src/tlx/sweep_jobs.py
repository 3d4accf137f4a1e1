"""A sweep's combinations run several at a time, each in a process forked from this one (``--jobs``).

A head on cached features trains on one thread, so a machine with N cores trains N combinations at once.
A combination whose features are not yet cached runs in this process, which extracts them on every core;
the backbones are extracted first, one after the other, while up to N - 1 combinations of backbones
already extracted train beside (so a core is not left idle while this process builds a model, exports it
or trains a head). Meanwhile a helper process readies the later backbones (builds, exports and probes
each, :class:`_Ahead`), so that their runs only recall them. Among the combinations ready to train, the
longest goes first, so that no long one is left running alone at the end: a combination's cost is
learned from the finished ones that train alike (same head and training settings), and one of a kind not
yet seen counts as the longest. Every number is the same as one at a time: heads train on one thread
either way, seeded the same.

A forked child sets its torch threads to one before any work (a child forked after this process's
OpenMP threads started must not start more), reports its progress lines, warnings and metrics to
this process over a pipe, and stops at this process's error or interrupt. Forking needs Linux;
elsewhere a sweep runs its combinations one at a time.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from tlx import notices
from tlx.errors import describe
from tlx.report import Console

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

#: runs one combination (its number in the sweep and its console): returns its metrics
RunOne = Callable[[int, Console], dict[str, Any]]


@dataclass
class _Child:
    process: BaseProcess
    number: int
    console: Console


def run_in_parallel(
    numbers: Sequence[int],
    jobs: int,
    run_one: RunOne,
    console_of: Callable[[int], Console],
    cached: Callable[[int], bool],
    backbone_of: Callable[[int], str],
    kind_of: Callable[[int], str],
    ready_backbone: Callable[[int], None],
) -> dict[int, dict[str, Any]]:
    """Run combinations ``numbers``, ``jobs`` at a time; returns the metrics of each.

    ``console_of(number)`` shows a combination's progress here; ``cached(number)`` says whether its
    backbone's features are all in the cache (then it runs in a child), ``backbone_of(number)`` which
    features it shares with others, ``kind_of(number)`` which combinations train alike (and so cost
    alike), ``ready_backbone(number)`` does what its run would do before extracting (see
    :class:`_Ahead`). The first error stops every child and is raised here.
    """
    import tlx.run
    import tlx.train  # noqa: F401 -- torch and the training code: imported once, here, not by every child

    ready: set[str] = set()
    queue = _extraction_first(list(numbers), backbone_of, cached, ready)
    costs: dict[str, list[float]] = {}
    results: dict[int, dict[str, Any]] = {}
    children: dict[Connection, _Child] = {}
    extractions = [n for n in queue if backbone_of(n) not in ready]
    ahead = _Ahead(extractions[1:], ready_backbone) if jobs > 1 and len(extractions) > 1 else None

    def finished(number: int, metrics: dict[str, Any]) -> None:
        results[number] = metrics
        seconds = metrics["seconds"]  # its training: an extraction is not the kind's cost
        costs.setdefault(kind_of(number), []).append(seconds["total"] - seconds["extract"])

    try:
        while queue or children:
            extracting = next((n for n in queue if backbone_of(n) not in ready), None)
            while len(children) < jobs - (extracting is not None):  # an extraction takes a core here
                number = _longest(queue, ready, backbone_of, kind_of, costs)
                if number is None:
                    break
                queue.remove(number)
                connection, process = _fork(number, run_one, console_of)
                children[connection] = _Child(process, number, console_of(number))
            if extracting is not None:
                queue.remove(extracting)
                if ahead is not None:
                    ahead.wait(extracting)
                finished(extracting, run_one(extracting, console_of(extracting)))
                ready.add(backbone_of(extracting))
            # after an extraction, all that came meanwhile (the next extraction waits for nothing);
            # else until something comes
            timeout = 0 if extracting is not None else None
            while children and (arrived := wait(list(children), timeout)):
                for connection in arrived:
                    child = children[connection]
                    done = _receive(connection, child)
                    if done is not None:
                        finished(child.number, done)
                        child.process.join()
                        del children[connection]
                if timeout is None:
                    break
    finally:
        _stop(children)
        if ahead is not None:
            ahead.stop()
    return results


def _longest(
    queue: list[int],
    ready: set[str],
    backbone_of: Callable[[int], str],
    kind_of: Callable[[int], str],
    costs: dict[str, list[float]],
) -> int | None:
    """The combination of ``queue`` to start next: of those whose features are cached, the one expected
    to take longest (a kind with no finished combination first); the earliest in ``queue`` of equals."""
    waiting = [n for n in queue if backbone_of(n) in ready]

    def expected(number: int) -> float:
        seen = costs.get(kind_of(number))
        return sum(seen) / len(seen) if seen else math.inf

    return max(waiting, key=expected, default=None)


def _extraction_first(
    numbers: list[int], backbone_of: Callable[[int], str], cached: Callable[[int], bool], ready: set[str]
) -> list[int]:
    """The first combination of each backbone not cached first (they extract), then the rest in order."""
    first: dict[str, int] = {}
    for number in numbers:
        key = backbone_of(number)
        if key in ready or key in first:
            continue
        if cached(number):
            ready.add(key)
        else:
            first[key] = number
    extracting = list(first.values())
    return extracting + [n for n in numbers if n not in extracting]


def _fork(
    number: int, run_one: RunOne, console_of: Callable[[int], Console]
) -> tuple[Connection, BaseProcess]:
    """Start combination ``number`` in a forked child; returns this end of its pipe and the process."""
    return _start(_child, (number, run_one, console_of), f"tlx-sweep-{number}")


def _start(target: Callable[..., None], args: tuple[Any, ...], name: str) -> tuple[Connection, BaseProcess]:
    """Fork a process running ``target(its end of a new pipe, *args)``; returns this end and the process."""
    here, there = multiprocessing.Pipe(duplex=False)
    sys.stdout.flush()
    sys.stderr.flush()
    process = multiprocessing.get_context("fork").Process(
        target=target, args=(there, *args), name=name, daemon=True
    )
    process.start()
    there.close()
    return here, process


class _Ahead:
    """A forked process that readies the backbones of combinations ``numbers``, one after the other,
    while this process extracts the first backbone: each is built, hashed, exported and probed as its
    run would do before extracting, on the core this process leaves idle while it builds and exports
    its own. The run then recalls them. Should it fail, its error is left to the run, which meets and
    reports it; its warnings likewise.
    """

    def __init__(self, numbers: list[int], ready_one: Callable[[int], None]) -> None:
        self.waiting = set(numbers)
        self.connection, self.process = _start(_ready_all, (numbers, ready_one), "tlx-sweep-ahead")

    def wait(self, number: int) -> None:
        """Until combination ``number``'s backbone is ready, or this helper has ended."""
        while number in self.waiting:
            try:
                self.waiting.discard(self.connection.recv())
            except EOFError:
                self.waiting.clear()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()
        self.connection.close()


def _ready_all(connection: Connection, numbers: list[int], ready_one: Callable[[int], None]) -> None:
    """The life of :class:`_Ahead`'s process: one thread, each backbone readied, its number sent."""
    import torch

    torch.set_num_threads(1)
    try:
        with notices.collected([]):
            for number in numbers:
                with contextlib.suppress(Exception):
                    ready_one(number)
                connection.send(number)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the sweep reports it
        pass
    finally:
        connection.close()


def _receive(connection: Connection, child: _Child) -> dict[str, Any] | None:
    """Handle one message from a child: show a line or a warning; its metrics once done; raise its error."""
    try:
        kind, payload = connection.recv()
    except EOFError:
        child.process.join()
        raise RuntimeError(
            f"sweep: the process running combination {child.number} ended without a result "
            f"(exit code {child.process.exitcode})"
        ) from None
    if kind == "echo":
        child.console.echo(payload)
    elif kind == "warning":
        child.console.warning(payload)
    elif kind == "notice":
        notices.warn(payload)
    elif kind == "error":
        raise payload
    else:
        return payload
    return None


def _stop(children: dict[Connection, _Child]) -> None:
    """End the children still running (after an error or an interrupt) and wait for them."""
    for child in children.values():
        if child.process.is_alive():
            child.process.terminate()
    for connection, child in children.items():
        child.process.join()
        connection.close()


class _Notices(list[str]):
    """Warnings outside the console (:func:`tlx.notices.warn`), sent to the parent as they come."""

    def __init__(self, connection: Connection) -> None:
        super().__init__()
        self.connection = connection

    def append(self, text: str) -> None:
        self.connection.send(("notice", text))


def _child(
    connection: Connection, number: int, run_one: RunOne, console_of: Callable[[int], Console]
) -> None:
    """A child's life: one thread, run the combination, send its metrics or its error.

    Its console formats lines as in the parent and sends them there to be shown.
    """
    import torch

    torch.set_num_threads(1)
    console = console_of(number)
    console.echo = lambda text: connection.send(("echo", text))  # type: ignore[method-assign]
    console.warning = lambda text: connection.send(("warning", text))  # type: ignore[method-assign]
    try:
        with notices.collected(_Notices(connection)):
            metrics = run_one(number, console)
        connection.send(("done", metrics))
    except BaseException as exc:
        try:
            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(describe(exc))
        connection.send(("error", exc))
    finally:
        connection.close()
