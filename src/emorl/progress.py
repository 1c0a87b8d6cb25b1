"""Progress bars for long work (training, search, decoding, evaluation): rich bars on a terminal, a plain line every
N seconds where stdout is not one (CI logs, ``| tee``). A module of its own so every stage can use it without
importing the trainer.

While bars are drawn, console log lines go through the bars' own writer (rich's console, ``tqdm.write``), which
prints them above the bars: a log line never splits a bar."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class Progress:
    """One progress bar per policy or stage (step / budget, last rewards, prompts consumed, ETA); silent if disabled.

    On a terminal: rich bars (stderr). Where stdout is not a terminal (CI logs, ``| tee``), bars would print
    nothing readable, so each task gets a plain line on stdout at most every ``every`` seconds (default 30;
    ``EMORL_PROGRESS_EVERY``) and once when the run ends: ``name: step 5/12 (42%) ... elapsed 1m02s, ETA 1m27s``."""

    def __init__(self, enabled: bool, every: float | None = None, plain: bool | None = None):
        import os
        import sys

        self.enabled = enabled
        self.every = float(os.environ.get("EMORL_PROGRESS_EVERY", 30)) if every is None else every
        self.plain = (not sys.stdout.isatty()) if plain is None else plain
        self._p = None
        self._tasks: dict[str, Any] = {}
        self._lines: dict[str, dict[str, Any]] = {}  # plain mode: per task start/last-print bookkeeping

    @contextlib.contextmanager
    def run(self) -> Iterator[Progress]:
        if not self.enabled:
            yield self
            return
        if self.plain:
            try:
                yield self
            finally:
                for name, t in self._lines.items():
                    if t["printed_at"] != t["completed"]:
                        self._print_line(name)
            return
        import sys

        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        from emorl.utils import console

        self._p = RichProgress(
            TextColumn("[bold]{task.fields[name]:>12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console(),
            transient=False)
        consoles = (sys.stdout, sys.stderr)
        try:
            with self._p, logs_through(sys.stderr, consoles):  # rich's live display swapped stderr for its proxy
                yield self
        finally:
            self._p = None

    def add(self, name: str, total: int, completed: int = 0) -> None:
        if not self.enabled:
            return
        if self.plain:
            now = time.monotonic()
            self._lines[name] = {"total": total, "completed": completed, "start": completed, "t0": now,
                                 "last": now, "info": "", "printed_at": completed}
        elif self._p is not None:
            self._tasks[name] = self._p.add_task(name, total=total, completed=completed, name=name, info="")

    def update(self, name: str, completed: int, info: str) -> None:
        if not self.enabled:
            return
        if self.plain and name in self._lines:
            t = self._lines[name]
            t["completed"], t["info"] = completed, info
            if time.monotonic() - t["last"] >= self.every or completed >= t["total"]:
                self._print_line(name)
        elif self._p is not None and name in self._tasks:
            self._p.update(self._tasks[name], completed=completed, info=info)

    def line(self, name: str) -> str:
        """The plain progress line of one task."""
        t = self._lines[name]
        done, total = t["completed"], t["total"]
        elapsed = time.monotonic() - t["t0"]
        rate = (done - t["start"]) / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {_clock((total - done) / rate)}" if rate > 0 and done < total else ""
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        info = f" {t['info']}" if t["info"] else ""
        return f"{name}: step {done}/{total}{pct}{info}, elapsed {_clock(elapsed)}{eta}"

    def _print_line(self, name: str) -> None:
        t = self._lines[name]
        print(self.line(name), flush=True)
        t["last"], t["printed_at"] = time.monotonic(), t["completed"]


class PlainBar:
    """A tqdm-like bar for a stage driven outside :class:`Progress` (the search's points, ``generate``'s steps): on
    a terminal, tqdm; elsewhere the same plain line as :class:`Progress` at most every ``every`` seconds, and once
    at the end."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: float | None = None) -> None:
        self._p = Progress(True, every=every, plain=True)
        self._p.add(desc, total)
        self.desc, self.n, self.info = desc, 0, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        self._p.update(self.desc, self.n, self.info)

    def set_postfix(self, refresh: bool = False, **kw: Any) -> None:
        self.info = " ".join(f"{k}={v}" for k, v in kw.items())
        self._p._lines[self.desc]["info"] = self.info

    def close(self) -> None:
        t = self._p._lines[self.desc]
        if t["printed_at"] != t["completed"]:
            self._p._print_line(self.desc)


@contextlib.contextmanager
def logs_through(stream: Any, consoles: tuple[Any, ...]) -> Iterator[None]:
    """Inside the block, the root logger's console handlers (plain stream handlers writing to one of ``consoles``)
    write to ``stream`` instead: rich's proxy, which prints a line above the live bars. Restored on exit."""
    import logging

    if stream in consoles:  # not redirected (no live display): nothing to route
        yield
        return
    swapped = [(h, h.stream) for h in logging.getLogger().handlers
               if type(h) is logging.StreamHandler and h.stream in consoles]
    for h, _ in swapped:
        h.setStream(stream)
    try:
        yield
    finally:
        for h, old in swapped:
            h.setStream(old)


def progress_bar(total: int, desc: str, unit: str = "it") -> Any:
    """tqdm on a terminal (log lines go through ``tqdm.write`` while it is open: tqdm's
    ``logging_redirect_tqdm``), :class:`PlainBar` lines where stdout is not one (CI logs, ``| tee``)."""
    import sys

    if sys.stdout.isatty():
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        class LoggingBar(tqdm):  # type: ignore[misc,valid-type]
            """A tqdm bar that routes console log lines above itself from creation to :meth:`close`."""

            def __init__(self, *args: Any, **kw: Any) -> None:
                self._redirect: Any = logging_redirect_tqdm(tqdm_class=tqdm)
                self._redirect.__enter__()
                super().__init__(*args, **kw)

            def close(self) -> None:
                try:
                    super().close()
                finally:
                    redirect, self._redirect = getattr(self, "_redirect", None), None
                    if redirect is not None:
                        redirect.__exit__(None, None, None)

        return LoggingBar(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return PlainBar(total, desc, unit)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
