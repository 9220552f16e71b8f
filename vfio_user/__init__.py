"""A vfio-user server library: serve an emulated device (a PCI function) to QEMU's
``vfio-user-pci`` over a Unix socket.

Layers, bottom up: :mod:`~vfio_user.messages` (the wire format, validated),
:mod:`~vfio_user.connection` (framing and file descriptors),
:mod:`~vfio_user.dma` and :mod:`~vfio_user.irqs` (the client's memory windows and
interrupt eventfds), :mod:`~vfio_user.dispatcher` (one session: the dispatch
table and every check), :mod:`~vfio_user.server` (the socket on an asyncio
loop). A device implements :class:`~vfio_user.function.Function`.
:mod:`~vfio_user.client` is a client for tests and benchmarks.

Nothing here knows about virtio or any particular device.
"""

from vfio_user.errors import CommandError, DisconnectedError, ProtocolError, VfioUserError
from vfio_user.function import Function, RegionSpec
from vfio_user.irqs import IrqSpec, IrqTable
from vfio_user.server import VfioUserServer

__all__ = [
    "CommandError",
    "DisconnectedError",
    "Function",
    "IrqSpec",
    "IrqTable",
    "ProtocolError",
    "RegionSpec",
    "VfioUserError",
    "VfioUserServer",
]
