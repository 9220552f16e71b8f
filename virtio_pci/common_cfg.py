"""The common configuration structure: features, status, and the per-queue registers.

The registers that are the transport's own (selectors, queue sizes,
addresses, vectors, enables) live here; everything with a virtio rule behind
it goes to the device: the features the driver writes
(:meth:`BalloonDevice.write_driver_features`), the status register
(:meth:`BalloonDevice.set_status`, read back with ``read_status``). Enabling a
queue and the status write are reported to the owner (the function), which
starts queues and interrupts.

Reads work at any width and offset (byte by byte from the fields); a write
must be one whole field, or one 32-bit half of a 64-bit queue address:
anything else is ignored and counted, as is a write to a read-only field.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from device import BalloonDevice
from virtio_pci.layout import (
    COMMON_SIZE,
    COMMON_WIDTH,
    MSIX_VECTORS,
    NO_VECTOR,
    QUEUE_SIZE_MAX,
    Common,
)

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
#: Fields a driver may write.
_WRITABLE = {
    Common.DEVICE_FEATURE_SELECT,
    Common.DRIVER_FEATURE_SELECT,
    Common.DRIVER_FEATURE,
    Common.CONFIG_MSIX_VECTOR,
    Common.DEVICE_STATUS,
    Common.QUEUE_SELECT,
    Common.QUEUE_SIZE,
    Common.QUEUE_MSIX_VECTOR,
    Common.QUEUE_ENABLE,
    Common.QUEUE_DESC_LO,
    Common.QUEUE_DESC_HI,
    Common.QUEUE_DRIVER_LO,
    Common.QUEUE_DRIVER_HI,
    Common.QUEUE_DEVICE_LO,
    Common.QUEUE_DEVICE_HI,
}
#: Start offset and width of the field holding each byte of the structure.
_FIELD_AT: dict[int, tuple[Common, int]] = {
    field + i: (field, w) for field, w in COMMON_WIDTH.items() for i in range(w)
}


@dataclass
class QueueRegs:
    """The driver's settings of one queue."""

    size: int = QUEUE_SIZE_MAX
    vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


class CommonConfig:
    """The register file of one function.

    :param device: the virtio device behind it
    :param num_queues: queues the device can have (the most any feature set gives)
    :param on_enable: called with a queue index when the driver enables it
    :param on_status: called after each write of the status register (with the value)
    """

    def __init__(
        self,
        device: BalloonDevice,
        num_queues: int,
        on_enable: Callable[[int], None],
        on_status: Callable[[int], None],
    ) -> None:
        self.device = device
        self.num_queues = num_queues
        self.on_enable = on_enable
        self.on_status = on_status
        self.ignored_writes = 0
        self.reset()

    def reset(self) -> None:
        """The transport's part of a device reset (the device resets itself)."""
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.queue_select = 0
        self.generation = 0
        self.queues = [QueueRegs() for _ in range(self.num_queues)]

    @property
    def selected(self) -> QueueRegs | None:
        """The queue ``queue_select`` names, None past the last one."""
        if self.queue_select < self.num_queues:
            return self.queues[self.queue_select]
        return None

    # -- reads ------------------------------------------------------------------------

    def _value(self, field: Common) -> int:
        q = self.selected
        match field:
            case Common.DEVICE_FEATURE_SELECT:
                return self.device_feature_select
            case Common.DEVICE_FEATURE:
                sel = self.device_feature_select
                return self.device.offered_features >> (32 * sel) & 0xFFFFFFFF if sel < 2 else 0
            case Common.DRIVER_FEATURE_SELECT:
                return self.driver_feature_select
            case Common.DRIVER_FEATURE:
                sel = self.driver_feature_select
                return self.driver_features >> (32 * sel) & 0xFFFFFFFF if sel < 2 else 0
            case Common.CONFIG_MSIX_VECTOR:
                return self.config_vector
            case Common.NUM_QUEUES:
                return self.num_queues
            case Common.DEVICE_STATUS:
                return self.device.read_status()
            case Common.CONFIG_GENERATION:
                return self.generation
            case Common.QUEUE_SELECT:
                return self.queue_select
            case Common.QUEUE_NOTIFY_OFF:
                return self.queue_select if q is not None else 0
        if q is None:
            return 0
        match field:
            case Common.QUEUE_SIZE:
                return q.size if self._exists(self.queue_select) else 0
            case Common.QUEUE_MSIX_VECTOR:
                return q.vector
            case Common.QUEUE_ENABLE:
                return int(q.enabled)
            case Common.QUEUE_DESC_LO | Common.QUEUE_DESC_HI:
                return _half(q.desc, field - Common.QUEUE_DESC_LO)
            case Common.QUEUE_DRIVER_LO | Common.QUEUE_DRIVER_HI:
                return _half(q.driver, field - Common.QUEUE_DRIVER_LO)
            case Common.QUEUE_DEVICE_LO | Common.QUEUE_DEVICE_HI:
                return _half(q.device, field - Common.QUEUE_DEVICE_LO)
        return 0  # NOTIF_CONFIG_DATA, QUEUE_RESET: their features are not offered

    def _exists(self, index: int) -> bool:
        """Whether queue ``index`` exists with the features negotiated (offered, before)."""
        return self.device.layout.queue_at(index) is not None

    def read(self, offset: int, count: int) -> bytes:
        """Bytes ``[offset, offset + count)`` of the structure (zeros past its fields)."""
        out = bytearray(count)
        values: dict[Common, int] = {}
        for i in range(count):
            at = _FIELD_AT.get(offset + i)
            if at is None:
                continue
            field, _ = at
            if field not in values:
                values[field] = self._value(field)
            out[i] = values[field] >> (8 * (offset + i - field)) & 0xFF
        return bytes(out)

    # -- writes ------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        """A driver write (see the module doc for what is accepted)."""
        at = _FIELD_AT.get(offset)
        if offset >= COMMON_SIZE or at is None or at[0] != offset or at[1] != len(data):
            self._ignore(f"write of {len(data)} bytes at {offset:#x}")
            return
        field = at[0]
        if field not in _WRITABLE:
            self._ignore(f"write to read-only {field.name.lower()}")
            return
        value = int.from_bytes(data, "little")
        self._write_field(field, value)

    def _ignore(self, what: str) -> None:
        self.ignored_writes += 1
        log.debug("common config: %s ignored", what)

    def _write_field(self, field: Common, value: int) -> None:
        match field:
            case Common.DEVICE_FEATURE_SELECT:
                self.device_feature_select = value
            case Common.DRIVER_FEATURE_SELECT:
                self.driver_feature_select = value
            case Common.DRIVER_FEATURE:
                sel = self.driver_feature_select
                if sel >= 2:
                    self._ignore(f"driver features of select {sel}")
                    return
                shift = 32 * sel
                self.driver_features = (
                    self.driver_features & ~(0xFFFFFFFF << shift) | value << shift
                ) & _MASK64
                self.device.write_driver_features(self.driver_features)
            case Common.CONFIG_MSIX_VECTOR:
                self.config_vector = _vector(value)
            case Common.DEVICE_STATUS:
                if value == 0:
                    self.reset()
                self.device.set_status(value)
                self.on_status(value)
            case Common.QUEUE_SELECT:
                self.queue_select = value
            case _:
                self._write_queue(field, value)

    def _write_queue(self, field: Common, value: int) -> None:
        q = self.selected
        if q is None:
            self._ignore(f"{field.name.lower()} of queue {self.queue_select}")
            return
        if q.enabled and field is not Common.QUEUE_MSIX_VECTOR:
            # Spec: the driver sets a queue up before enabling it; a running queue's
            # ring does not move under the device.
            self._ignore(f"{field.name.lower()} of enabled queue {self.queue_select}")
            return
        match field:
            case Common.QUEUE_SIZE:
                q.size = value
            case Common.QUEUE_MSIX_VECTOR:
                q.vector = _vector(value)
            case Common.QUEUE_ENABLE:
                if value == 1:
                    q.enabled = True
                    self.on_enable(self.queue_select)
                else:
                    self._ignore(f"queue_enable {value}")
            case Common.QUEUE_DESC_LO | Common.QUEUE_DESC_HI:
                q.desc = _set_half(q.desc, field - Common.QUEUE_DESC_LO, value)
            case Common.QUEUE_DRIVER_LO | Common.QUEUE_DRIVER_HI:
                q.driver = _set_half(q.driver, field - Common.QUEUE_DRIVER_LO, value)
            case Common.QUEUE_DEVICE_LO | Common.QUEUE_DEVICE_HI:
                q.device = _set_half(q.device, field - Common.QUEUE_DEVICE_LO, value)


def _vector(value: int) -> int:
    """A vector the function has, else NO_VECTOR (what the driver reads back as refusal)."""
    return value if value < MSIX_VECTORS else NO_VECTOR


def _half(value: int, which: int) -> int:
    return value >> (8 * which) & 0xFFFFFFFF


def _set_half(value: int, which: int, half: int) -> int:
    shift = 8 * which
    return (value & ~(0xFFFFFFFF << shift) | (half & 0xFFFFFFFF) << shift) & _MASK64
