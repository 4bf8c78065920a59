"""What a run prints: messages by level, the progress bar, speed, the closing summary.

Every line goes through a `Console`, which passes it to an `echo` callable (click.echo
in the CLI, a list's append in tests) if its level is high enough. The chief shows
everything; other workers show only what differs from the chief (its strategy line,
warnings, why it stopped), so `--workers N` output is not N copies of the same story.
Levels are the `logging` module's, with one of ours between INFO and WARNING.
"""

from __future__ import annotations

import logging
import sys
import time

import keras

from trainer.say import Say

# Lines every worker shows: its strategy, and why it stopped.
EVERY_WORKER = 25
logging.addLevelName(EVERY_WORKER, "EVERY_WORKER")


class Console:
    """Lines at or above `level` reach `echo`."""

    def __init__(self, echo: Say = print, level: int = logging.INFO) -> None:
        self.echo, self.level = echo, level

    @classmethod
    def for_worker(cls, echo: Say, is_chief: bool) -> Console:
        return cls(echo, logging.INFO if is_chief else EVERY_WORKER)

    def info(self, line: str) -> None:
        self._emit(logging.INFO, line)

    def every_worker(self, line: str) -> None:
        self._emit(EVERY_WORKER, line)

    def warning(self, line: str) -> None:
        """`line` as given: callers start it with "Warning:"."""
        self._emit(logging.WARNING, line)

    def _emit(self, level: int, line: str) -> None:
        if level >= self.level:
            self.echo(line)


class Speed:
    """Images per second, leaving out the first call (it includes tracing)."""

    def __init__(self) -> None:
        self.images, self.seconds, self.calls, self.last = 0, 0.0, 0, 0.0

    def add(self, images: int, seconds: float) -> None:
        self.calls += 1
        self.last = images / seconds if seconds else 0.0
        if self.calls > 1:
            self.images += images
            self.seconds += seconds

    @property
    def mean(self) -> float:
        return self.images / self.seconds if self.seconds else self.last


class PlainProgress:
    """Progress for logs (CI, pipes, `--workers` prefixes): a whole line every `interval` s."""

    def __init__(self, target: int, echo: Say, interval: float = 15.0) -> None:
        self.target, self.echo, self.interval = target, echo, interval
        self.start = self.last = time.perf_counter()

    def update(self, current: int, values: list[tuple[str, float]]) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval and current < self.target:
            return
        self.last = now
        eta = (now - self.start) / max(current, 1) * (self.target - current)
        shown = " - ".join(f"{name}: {value:.4g}" for name, value in values)
        self.echo(f"  step {current}/{self.target} - {shown} - ETA {eta:.0f}s")


class _Silent:
    def update(self, current: int, values: list[tuple[str, float]]) -> None:
        pass


def progress_bar(target: int, console: Console):
    """Keras' Progbar in a terminal; plain periodic lines otherwise (it assumes a terminal).

    Only where the console shows INFO lines (the chief): other workers show no progress.
    """
    if console.level > logging.INFO:
        return _Silent()
    if sys.stdout.isatty():
        return keras.utils.Progbar(target, unit_name="step", stateful_metrics=["loss", "accuracy", "img/s"])
    return PlainProgress(target, console.info)


def summary_table(rows: list[tuple[str, str]]) -> str:
    """The closing "Done." table: one aligned `name  value` row each."""
    width = max(len(name) for name, _ in rows)
    return "Done.\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
