"""Progress bars that suit where they are read.

On a terminal: tqdm's live bar. Anywhere else (a cluster job's log file, CI, a pipe) carriage-return
updates pile up: tqdm refreshes up to 10 times a second, about 1 MB of log for a 10-minute epoch.
There each bar prints a plain line at most every ``CXRCAM_LOG_INTERVAL`` seconds (default 60), and
its last state when it ends.
"""
from __future__ import annotations

import io
import os
import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL = float(os.environ.get("CXRCAM_LOG_INTERVAL", "60"))


class _Lines(io.TextIOBase):
    """A stream that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable=None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; in a log, a line per ``LOG_INTERVAL`` seconds and
    one at the end (``leave`` is then always on, so the log keeps each bar's last state)."""
    stream = kwargs.pop("file", None) or sys.stderr
    if not _is_terminal(stream):
        kwargs.update(file=_Lines(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, ascii=True,
                      ncols=110, dynamic_ncols=False, leave=True)
    else:
        kwargs["file"] = stream
    return tqdm(iterable, **kwargs)


__all__ = ["progress_bar", "LOG_INTERVAL"]
