"""vballoon's transport-agnostic virtio balloon device.

Public API: build a :class:`GuestMemory`, a :class:`BalloonDevice`, attach an
:class:`Interrupts` implementation, drive its lifecycle (``set_status``, or
``negotiate``/``activate``/``stop``/``reset``), hand it :class:`SplitQueue`
states and call ``queue_notify`` on kicks (or let a :class:`QueueRunner` do it
on an asyncio loop). Read it through :meth:`BalloonDevice.snapshot`. Importing
fails with a build hint if the C accelerator is missing.
"""

from device.balloon import BalloonConfig, BalloonDevice, Interrupts, NullInterrupts
from device.defs import Feature, Queue, StatTag, Status
from device.errors import (
    BalloonError,
    ChainError,
    ConfigError,
    GuestError,
    RingError,
    RingUnmapped,
)
from device.handlers import FreePageHints, GuestStats, HintState, QueueHandler
from device.layout import QueueLayout, queue_layout
from device.memory import DiscardMode, GuestMemory, MemoryRegion, RegionSpec
from device.metrics import BalloonMetrics
from device.runner import QueueRunner
from device.snapshot import DeviceSnapshot, HintSnapshot
from device.virtqueue import DescriptorChain, SplitQueue

__all__ = [
    "BalloonConfig",
    "BalloonDevice",
    "BalloonError",
    "BalloonMetrics",
    "ChainError",
    "ConfigError",
    "DescriptorChain",
    "DeviceSnapshot",
    "DiscardMode",
    "Feature",
    "FreePageHints",
    "GuestError",
    "GuestMemory",
    "GuestStats",
    "HintSnapshot",
    "HintState",
    "Interrupts",
    "MemoryRegion",
    "NullInterrupts",
    "Queue",
    "QueueHandler",
    "QueueLayout",
    "QueueRunner",
    "RegionSpec",
    "RingError",
    "RingUnmapped",
    "SplitQueue",
    "StatTag",
    "Status",
    "queue_layout",
]
