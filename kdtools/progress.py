"""Progress reporting without printing: library code calls a callback, the CLI draws it.

A callback receives ``ProgressEvent`` objects. ``total`` may be None when the amount of work is
unknown (e.g. reading a pipe). ``info`` carries live figures such as the loss or queries spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class ProgressEvent:
    task: str  # a short name, e.g. "epoch 3/10" or "querying"
    completed: float
    total: Optional[float] = None
    info: dict = field(default_factory=dict)
    done: bool = False  # the task is finished; a renderer may drop its bar


ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """The default callback: report nothing."""
