"""vballoon's transport-agnostic virtio balloon device.

Public API: build a :class:`GuestMemory`, a :class:`BalloonDevice` with an
:class:`Interrupts` implementation, hand it :class:`SplitQueue` states and
call ``queue_notify`` on kicks. Importing fails with a build hint if the C
accelerator is missing.
"""

from device.balloon import BalloonConfig, BalloonDevice, Interrupts
from device.defs import Feature, Queue, StatTag, Status
from device.errors import (
    BalloonError,
    ChainError,
    ConfigError,
    DiscardError,
    GuestError,
    RingError,
    RingUnmapped,
)
from device.handlers import FreePageHints, GuestStats, HintState
from device.layout import QueueLayout, queue_layout
from device.memory import DiscardMode, GuestMemory, MemoryRegion, RegionSpec
from device.metrics import BalloonMetrics
from device.virtqueue import DescriptorChain, SplitQueue

__all__ = [
    "BalloonConfig",
    "BalloonDevice",
    "BalloonError",
    "BalloonMetrics",
    "ChainError",
    "ConfigError",
    "DescriptorChain",
    "DiscardError",
    "DiscardMode",
    "Feature",
    "FreePageHints",
    "GuestError",
    "GuestMemory",
    "GuestStats",
    "HintState",
    "Interrupts",
    "MemoryRegion",
    "Queue",
    "QueueLayout",
    "RegionSpec",
    "RingError",
    "RingUnmapped",
    "SplitQueue",
    "StatTag",
    "Status",
    "queue_layout",
]
