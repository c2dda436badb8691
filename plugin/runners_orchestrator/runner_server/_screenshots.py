"""Screenshots of failed browser checks, kept in memory and served by URL.

A result carries only the URL of its screenshot (``details.screenshot``), so results stay
small however many checks fail; the image is fetched from the runner server when someone
looks. The server keeps the most recent ones (bounded by count), which is what a person
looking at a failure just after the run needs; nothing is written to disk.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict

__all__ = ["ScreenshotStore"]


class ScreenshotStore:
    """The last ``limit`` screenshots (JPEG bytes), by an id nobody can guess."""

    def __init__(self, limit: int = 200) -> None:
        self.limit = limit
        self._shots: OrderedDict[str, bytes] = OrderedDict()

    def add(self, data: bytes) -> str:
        """Keep ``data``, forgetting the oldest beyond the limit; return its id."""
        shot_id = uuid.uuid4().hex
        self._shots[shot_id] = data
        while len(self._shots) > self.limit:
            self._shots.popitem(last=False)
        return shot_id

    def get(self, shot_id: str) -> bytes | None:
        """The screenshot ``shot_id``, or ``None`` once forgotten (or never taken)."""
        return self._shots.get(shot_id)

    def __len__(self) -> int:
        return len(self._shots)
