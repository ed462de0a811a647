"""What a long run tells the person waiting for it: a line per block with the time left, and the time of each
phase with the peak memory at the end.

A 7B-class model takes the better part of an hour here; a run that prints nothing for minutes looks hung. Each
finished block prints one line (on a terminal or not: logs of batch jobs get them too), with an estimate of
the time left from the weight bytes done so far, since blocks differ in size (the embedding, the LM head).
On a terminal a bar also counts the runs inside the block.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from sqonnx.streaming.blocks import Block


class Progress:
    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.phases: dict[str, float] = {}
        self._bar = None
        self._task = None
        self._pass = ""
        self._done_bytes = 0
        self._total_bytes = 0
        self._count = 0
        self._pass_started = 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def start_pass(self, label: str, blocks: list[Block]) -> None:
        self._pass, self._count = label, len(blocks)
        self._done_bytes, self._total_bytes = 0, sum(max(b.weight_bytes, 1) for b in blocks)
        self._pass_started = time.perf_counter()

    @contextmanager
    def block(self, block: Block, runs: int) -> Iterator[None]:
        """Wraps the work on one block; a bar of `runs` runs on a terminal, a line when the block is done."""
        start = time.perf_counter()
        bar = None
        if self.enabled and self.stream.isatty() and runs:
            from rich.console import Console
            from rich.progress import Progress as Bar

            bar = Bar(transient=True, console=Console(file=self.stream))
            bar.start()
            self._bar, self._task = bar, bar.add_task(f"{self._pass} block {block.index + 1}/{self._count}",
                                                       total=runs)
        try:
            yield
        finally:
            if bar is not None:
                bar.stop()
            self._bar = self._task = None
        self._done_bytes += max(block.weight_bytes, 1)
        if self.enabled and self._count > 1:  # a model in one block: the closing summary says it all
            elapsed = time.perf_counter() - self._pass_started
            left = elapsed * (self._total_bytes - self._done_bytes) / self._done_bytes
            print(f"{self._pass}: block {block.index + 1}/{self._count} ({block.label}, "
                  f"{block.weight_bytes / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s, memory "
                  f"{rss_bytes() / 1e9:.2f} GB; {_duration(elapsed)} so far, about {_duration(left)} left",
                  file=self.stream, flush=True)

    def note(self, message: str) -> None:
        """One line about the run (what the user may want to know while waiting), when progress is shown."""
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def tick(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kilobytes; 0 where there is no `resource`)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_memory() -> None:
    """Give a finished block's memory back: graphs are reference cycles (nodes <-> values), freed only when the
    cycle collector runs, which it otherwise rarely does; and glibc keeps freed blocks of a few MB in its heap
    (its mmap threshold grows with the sizes freed), so without a trim the resident memory creeps up block
    after block (TinyLlama: 0.17 -> 0.66 GB over 24 blocks)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():  # -> ctypes.CDLL | None
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        library = ctypes.CDLL(name) if name else None
        return library if library is not None and hasattr(library, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def rss_bytes() -> int:
    """The process's resident memory now (Linux; 0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
