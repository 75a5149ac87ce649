"""Progress of long start-up work: a tqdm bar on a terminal, periodic log lines elsewhere.

A bar redraws itself with carriage returns; written into a log file it becomes one huge line. So
when stderr is not a terminal, `progress()` logs a line every `every` seconds instead (and one at
the end if it logged any), on the logger of the module that asked.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

_EVERY = 10.0  # seconds between log lines


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str,
             unit: str = "it", disable: bool = False, logger: str | None = None,
             every: float = _EVERY):
    """A progress bar over `iterable` (or `total` steps, advanced by `.update(n)`), usable as
    tqdm is: iterate it, or `with progress(...) as bar: bar.update(1)`, then `.close()`. Log
    lines go to `logger` (default: the calling module's)."""
    if logger is None:
        logger = sys._getframe(1).f_globals.get("__name__", "jaxserve")
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not disable and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, disable=disable,
                       logger=logging.getLogger(logger), every=every)


class LogProgress:
    """tqdm's interface (iterate, `update`, `close`, context manager) as periodic log lines."""

    def __init__(self, iterable: Iterable[Any] | None, *, total: int | None, desc: str,
                 unit: str, disable: bool, logger: logging.Logger, every: float):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.logger, self.every = disable, logger, every
        self.n, self.lines, self._logged_n = 0, 0, 0
        self.start = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "progress() was given no iterable"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.every:
            self._last = now
            self._log(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.lines and self.n != self._logged_n:  # quick work: no line
            self._log(time.monotonic())

    def _log(self, now: float) -> None:
        self.lines, self._logged_n = self.lines + 1, self.n
        of = f"/{self.total}" if self.total else ""
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        self.logger.info("%s: %d%s %ss%s in %.0f s", self.desc, self.n, of, self.unit, share,
                         now - self.start)
