"""A typed, read-only picture of one balloon device, for everything above ``device/``.

The control socket, the daemons' log lines and the metrics read the device
through :meth:`device.BalloonDevice.snapshot` only, never its internals: what
the picture holds is the device's public state, with one meaning each.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HintSnapshot:
    """Free-page-hint state (spec "Free Page Hinting")."""

    state: str
    """``idle``, ``requested``, ``running``, ``stopped`` or ``done``."""
    cmd_id: int
    """The command id in the config space now."""
    hinted_frames: int
    """4 KiB frames hinted under the current id."""
    ranges: int
    """Hinted ranges recorded."""
    ranges_dropped: int
    """Hinted ranges not recorded (the record is bounded)."""


@dataclass(frozen=True)
class DeviceSnapshot:
    """The device's state at one moment."""

    offered_features: int
    """Feature bits the device offers."""
    driver_features: int
    """Feature bits the driver accepted (0 before FEATURES_OK)."""
    status: int
    """The device status register (spec "Device Status Field")."""
    running: bool
    """DRIVER_OK is set and the device was not stopped or failed: queues are serviced."""
    layout: dict[str, int]
    """Queue name (``inflate``, ``free_page``...) to index, for the negotiated features."""
    active_queues: tuple[int, ...]
    """Indices of the queues set up by the transport."""
    broken_queues: tuple[int, ...]
    """Indices of queues stopped until reset because the driver corrupted them."""
    ram_size: int | None
    """Bytes of guest RAM in the memory map, or None while there is none."""
    num_pages: int
    """The target: 4 KiB pages the guest is asked to give (config ``num_pages``)."""
    actual: int
    """4 KiB pages the guest says its balloon holds (config ``actual``, written by the guest)."""
    tracked_frames: int
    """4 KiB frames the device itself recorded as ballooned since the device last stopped.

    Huge-page accumulation needs them; they are forgotten whenever the device stops
    (a stop may be a guest reset), so after a VM pause this is below ``actual``."""
    poison_val: int
    """The guest's page poison value (PAGE_POISON)."""
    stats_interval: float
    """Seconds between statistics refreshes (0: only on request)."""
    stats: dict[str, int]
    """The guest's latest statistics by QMP name (``stat-free-memory``...)."""
    stats_updated: float
    """Wall-clock time of the latest statistics (seconds since the epoch; 0: none yet)."""
    stats_age: float | None
    """Seconds since the latest statistics (device clock), None if none yet."""
    hints: HintSnapshot
    """Free-page-hint state."""
    counters: dict[str, int] = field(default_factory=dict)
    """Every :class:`device.BalloonMetrics` counter by name."""
