"""The virtio-pci modern transport as a vfio-user PCI function.

:class:`VirtioPciFunction` puts a :class:`device.BalloonDevice` behind PCI
config space, the virtio capabilities, the common configuration registers,
MSI-X and INTx, for :class:`vfio_user.VfioUserServer` to serve to QEMU's
``vfio-user-pci``. The virtio rules stay in ``device/``; this package holds
only what PCI and the virtio-pci layout add.
"""

from virtio_pci.function import VIRTIO_ID_BALLOON, VirtioPciFunction

__all__ = ["VIRTIO_ID_BALLOON", "VirtioPciFunction"]
