"""What the demo shows while it trains: one progress line per arm, and pml kept quiet.

pml's trainers and testers draw a tqdm bar per epoch and per evaluation, and its trainer
formats the loss tensor in a way that makes torch warn. Inside the demo both are noise:
:func:`quiet_pml` turns them off for the duration of a ``with`` block and restores them
afterwards, so a user's own pml code keeps its bars and warnings.
"""

from __future__ import annotations

import functools
import shutil
import sys
import time
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

# pml modules that draw tqdm bars during training and testing (module.tqdm.tqdm(...)).
_PML_TQDM_MODULES = (
    "pytorch_metric_learning.trainers.base_trainer",
    "pytorch_metric_learning.testers.base_tester",
)
# Harmless for the demo: pml's trainer formats the (grad-carrying) loss with "%.5f".
_HARMLESS_WARNINGS = ((UserWarning, r"Converting a tensor with requires_grad=True to a scalar"),)


@contextmanager
def quiet_pml() -> Iterator[None]:
    """Inside the block pml draws no tqdm bars and its known harmless warnings are hidden.

    Only pml's own trainer and tester modules are touched (their ``tqdm`` name points to
    a tqdm that is disabled); everything is restored on exit, also after an error.
    """
    import importlib

    import tqdm

    silent = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))
    modules = [importlib.import_module(name) for name in _PML_TQDM_MODULES]
    saved = [module.tqdm for module in modules]
    for module in modules:
        module.tqdm = silent
    try:
        with warnings.catch_warnings():
            for category, message in _HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for module, original in zip(modules, saved):
            module.tqdm = original


class ArmProgress:
    """One line per arm: redrawn in place on a terminal, printed once when it ends otherwise.

    An arm may train several runs (one per seed, see :meth:`next_run`); it still gets
    one line. On a terminal (``stream.isatty()``) the line of the running arm shows
    ``[i/n]``, the arm, the run, the epoch and the last batch loss, redrawn at most
    ``redraw_s`` apart, and is replaced by the arm's result line when it ends. Elsewhere
    (a log file, a pipe) only the result line is written, plus an ``epoch e/E`` line when
    an arm has run for ``heartbeat_s`` seconds since its last line, so that long runs
    still show life.

    Args:
        total: number of arms.
        stream: where to write (default ``sys.stdout``).
        interactive: force terminal (``True``) or plain (``False``) output; default
            ``stream.isatty()``.
        name_width: arm names are padded to this width, so the columns line up.
        redraw_s: least time between two redraws on a terminal.
        heartbeat_s: least time between two plain progress lines of one arm.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        name_width: int = 0,
        redraw_s: float = 0.1,
        heartbeat_s: float = 60.0,
    ) -> None:
        self.total = total
        self.name_width = name_width
        self.stream = stream if stream is not None else sys.stdout
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.redraw_s = redraw_s
        self.heartbeat_s = heartbeat_s
        self._index = 0
        self._name = ""
        self._epochs = 0
        self._runs = 1
        self._run = 0
        self._run_label = ""
        self._start = 0.0
        self._last_line = 0.0
        self._width = 0

    def start(self, name: str, epochs: int, runs: int = 1) -> None:
        """An arm begins: ``name`` as shown, ``epochs`` each of its ``runs`` will train."""
        self._index += 1
        self._name, self._epochs, self._runs = name, epochs, runs
        self._run, self._run_label = 0, ""
        self._start = self._last_line = time.perf_counter()
        if self.interactive:
            self._draw(f"{self._prefix()}starting")

    def next_run(self, label: str) -> None:
        """The arm's next run begins, e.g. ``label="seed 3"``; shown while it trains
        when the arm has more than one run."""
        self._run += 1
        self._run_label = label

    def update(self, epoch: int, loss: float) -> None:
        """A training batch of ``epoch`` (1-based) ended with total loss ``loss``."""
        now = time.perf_counter()
        run = ""
        if self._runs > 1:
            run = f"{self._run_label} ({self._run}/{self._runs})  "
        text = f"{self._prefix()}{run}epoch {epoch}/{self._epochs}  loss {loss:.4f}"
        if self.interactive:
            if now - self._last_line >= self.redraw_s:
                self._draw(text)
                self._last_line = now
        elif now - self._last_line >= self.heartbeat_s:
            self._write(f"{text}  ({now - self._start:.0f} s)\n")
            self._last_line = now

    def finish(self, outcome: str) -> None:
        """The arm ended; ``outcome`` completes its line (e.g. its main metrics)."""
        line = f"{self._prefix()}{outcome}  ({time.perf_counter() - self._start:.0f} s)"
        if self.interactive:
            self._draw(line)
            self._write("\n")
            self._width = 0
        else:
            self._write(line + "\n")

    def _prefix(self) -> str:
        counter = f"[{self._index:>{len(str(self.total))}}/{self.total}]"
        return f"{counter} {self._name:<{self.name_width}}  "

    def _draw(self, text: str) -> None:
        # \r back to the line start, then pad over what the previous draw left; a line
        # wider than the terminal would wrap and \r could no longer redraw it.
        text = text[: max(20, shutil.get_terminal_size().columns - 1)]
        self._write("\r" + text.ljust(self._width))
        self._width = len(text)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
