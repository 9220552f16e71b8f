"""Exceptions of the device model.

::

    BalloonError            anything the device model raises
     +-- GuestError         the driver broke a rule; counted, the chain skipped
     |    +-- ChainError    one descriptor chain is malformed (its head is known)
     |    +-- RingError     the ring itself is corrupt: the queue stops (broken)
     |         +-- RingUnmapped  the ring is not in the memory map right now (transient)
     +-- ConfigError        the host side asked for something impossible

A discard the kernel refuses is not an exception: it is counted
(``discard_errors``) and logged, and the buffer still goes back to the guest.

A transport never lets a ``GuestError`` escape to its event loop: the device
model turns them into counters, skipped chains or a broken queue.
"""


class BalloonError(Exception):
    """Base of every device-model error."""


class GuestError(BalloonError):
    """The guest driver broke a rule of the spec."""


class ChainError(GuestError):
    """A descriptor chain is malformed; it is returned with used length 0.

    :param head: the chain's head index, so the chain can still be returned.
    """

    def __init__(self, msg: str, head: int) -> None:
        super().__init__(msg)
        self.head = head


class RingError(GuestError):
    """The ring is corrupt (bad avail index, head out of range): stop the queue."""


class RingUnmapped(RingError):
    """The ring lies outside the current memory map: the frontend may be between two
    memory-table updates, so this is not held against the guest."""


class ConfigError(BalloonError):
    """Invalid host-side configuration (memory map, queue setup, options)."""
