"""Queue layout: which queue sits at which index for a set of features.

Rule (what Linux, QEMU, crosvm and cloud-hypervisor do, not the spec's
literal fixed numbers): inflate 0, deflate 1, then stats, free-page,
reporting and range-report in that order, each only if its feature is
present, each taking the next free index.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.defs import QUEUE_FEATURE, Queue


@dataclass(frozen=True)
class QueueLayout:
    """Queues by index for one feature set."""

    queues: tuple[Queue, ...]

    def __len__(self) -> int:
        return len(self.queues)

    def index(self, queue: Queue) -> int | None:
        """Index of ``queue``, or None if it does not exist."""
        try:
            return self.queues.index(queue)
        except ValueError:
            return None

    def queue_at(self, index: int) -> Queue | None:
        """Which queue sits at ``index``, or None."""
        if 0 <= index < len(self.queues):
            return self.queues[index]
        return None

    def describe(self) -> dict[str, int]:
        """``{"inflate": 0, ...}`` for logs and queries."""
        return {q.name.lower(): i for i, q in enumerate(self.queues)}


def queue_layout(features: int) -> QueueLayout:
    """The layout for ``features`` (negotiated, or offered before negotiation)."""
    return QueueLayout(
        tuple(q for q in Queue if q not in QUEUE_FEATURE or features & QUEUE_FEATURE[q])
    )
