"""Live sample counts per experiment and variant, read from the experiment sample log
(gateway/samples.py defines it) as it grows.

The console asks every second or two; re-reading a log of millions of lines each time would
cost more than the gateway's requests. So the counter remembers how far it read and reads
only what was appended since; a file that was replaced (another inode) or truncated is
counted again from its start. Blocking file I/O: call `read` off the event loop.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass
class VariantCount:
    """One variant's samples so far: all of them, the live ones, and those that failed."""

    samples: int = 0
    shadow: int = 0
    errors: int = 0  # status 0 or >= 500, as the A/B report counts errors


class SampleCounts:
    """Per (experiment, variant) counts of one sample log, kept up to date incrementally."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # polls may overlap: one reader at a time
        self._reset(None, None)

    def _reset(self, path: Path | None, inode: int | None) -> None:
        self._path = path
        self._inode = inode
        self._offset = 0
        self._partial = b""  # a last line still being written
        self.malformed = 0
        self._counts: dict[tuple[str, str], VariantCount] = {}

    def read(self, path: Path) -> dict[tuple[str, str], VariantCount]:
        """The counts for the log at `path` as it is now (a missing log counts nothing)."""
        with self._lock:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self._reset(path, None)
                return {}
            if path != self._path or st.st_ino != self._inode or st.st_size < self._offset:
                self._reset(path, st.st_ino)
            if st.st_size > self._offset:
                with path.open("rb") as f:
                    f.seek(self._offset)
                    chunk = f.read(st.st_size - self._offset)
                self._offset += len(chunk)
                lines = (self._partial + chunk).split(b"\n")
                self._partial = lines.pop()
                for line in lines:
                    self._count(line)
            return {key: VariantCount(c.samples, c.shadow, c.errors) for key, c in self._counts.items()}

    def _count(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            obj = json.loads(line)
            key = (str(obj["experiment"]), str(obj["variant"]))
            status = int(obj["status"])
        except (ValueError, TypeError, KeyError):
            self.malformed += 1  # a crash mid-append leaves a partial line; it must not stop the count
            return
        count = self._counts.setdefault(key, VariantCount())
        count.samples += 1
        count.shadow += bool(obj.get("shadow", False))
        count.errors += status == 0 or status >= 500
