"""One line per phase of long work, with counts and the time left, relayed from a running notebook.

Progress bars are off inside the pipeline's kernels (they would fill the book's pages), so long
loops (`activations.collect`, `train.train_sae`) also call `Progress`. Under the pipeline,
$SAE_REPRO_PROGRESS names a file; each line goes there and the pipeline prints it as it comes
(`relay`). Elsewhere nothing is written.

    p = Progress("train SAE topk k=32 L=4608", total=214)
    for step in range(214):
        ...
        p.update(step + 1)        # a line at most every `every` seconds, and at the end
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

PROGRESS_ENV = "SAE_REPRO_PROGRESS"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Reports `what: done/total (elapsed, ~left)` to $SAE_REPRO_PROGRESS."""

    def __init__(self, what: str, total: int, every: float = 20.0):
        self.what, self.total, self.every = what, max(1, int(total)), every
        self.path = os.environ.get(PROGRESS_ENV)
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / done * (self.total - done) if done else float("nan")
        tail = "done" if done >= self.total else f"~{_duration(left)} left"
        with open(self.path, "a") as f:
            f.write(f"{self.what}: {done}/{self.total} ({_duration(elapsed)}, {tail})\n")


def relay(path: Path, prefix: str, stop: threading.Event, interval: float = 2.0) -> None:
    """Print the lines appended to `path` (prefixed) until `stop` is set; run it in a thread."""
    offset = 0
    while True:
        stopping = stop.wait(interval)
        if path.exists():
            with open(path) as f:
                f.seek(offset)
                for line in f.readlines():
                    if line.endswith("\n"):
                        print(f"{prefix}{line.rstrip()}", flush=True)
                offset = f.tell()
        if stopping:
            return
