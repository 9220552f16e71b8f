"""Interrupts of one client: the eventfds DEVICE_SET_IRQS installs, and VFIO's mask rules.

Each interrupt index (INTx, MSI-X, the error interrupt...) has a fixed number
of vectors, declared by the function. A vector has an eventfd (or none: the
event is dropped), a mask and a pending bit. The function raises a vector
with :meth:`IrqTable.trigger`; a masked vector only becomes pending, and an
index declared AUTOMASKED (INTx) masks itself on every trigger until the
client unmasks it (QEMU does after the guest's end-of-interrupt). That is
level-triggered INTx: the function lowers the line with :meth:`IrqTable.lower`
when the guest acknowledges (for virtio, reads ISR), and an unmask fires again
only while the line is still up.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vfio_user.errors import CommandError
from vfio_user.messages import IrqInfoFlag, IrqSetFlag, SetIrqs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IrqSpec:
    """One interrupt index as the function declares it.

    :param index: the index (``PciIrq`` for a PCI function)
    :param count: vectors (0: the index exists but is not implemented)
    :param flags: ``IrqInfoFlag`` bits reported to the client
    """

    index: int
    count: int
    flags: IrqInfoFlag = IrqInfoFlag.EVENTFD

    @property
    def automasked(self) -> bool:
        return bool(self.flags & IrqInfoFlag.AUTOMASKED)


@dataclass
class Vector:
    """One interrupt vector's state."""

    fd: int | None = None
    masked: bool = False
    pending: bool = False
    #: an unmask eventfd: a write to it unmasks this vector (VFIO's resample path)
    unmask_fd: int | None = None


@dataclass
class _Index:
    spec: IrqSpec
    vectors: list[Vector] = field(default_factory=list)
    #: the client enabled the index (installed or cleared eventfds since the last disable)
    enabled: bool = False


def _signal(fd: int) -> bool:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        return True  # the counter is full: its reader is woken anyway
    except OSError as err:
        log.warning("interrupt eventfd %d: %s", fd, err)
        return False
    return True


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


#: ``watch(fd, callback)`` / ``unwatch(fd)``: the server's event loop watching unmask fds.
Watch = Callable[[int, Callable[[], None]], None]
Unwatch = Callable[[int], None]


class IrqTable:
    """The interrupt state of one client connection.

    :param specs: the indexes the function declares
    :param watch: called to read an unmask eventfd when it becomes readable
    :param unwatch: called to stop that
    """

    def __init__(
        self,
        specs: Sequence[IrqSpec],
        watch: Watch | None = None,
        unwatch: Unwatch | None = None,
    ) -> None:
        self._indexes = {s.index: _Index(s, [Vector() for _ in range(s.count)]) for s in specs}
        self._watch = watch
        self._unwatch = unwatch
        #: events dropped because their vector had no eventfd
        self.dropped = 0
        self.triggered = 0

    # -- the function's side ---------------------------------------------------------

    def enabled(self, index: int) -> bool:
        """Whether the client enabled interrupt index ``index``."""
        ix = self._indexes.get(index)
        return ix is not None and ix.enabled

    def routed(self, index: int, vector: int) -> bool:
        """Whether ``vector`` of ``index`` has an eventfd (an event would be delivered)."""
        v = self._vector(index, vector)
        return v is not None and v.fd is not None

    def trigger(self, index: int, vector: int) -> None:
        """Raise ``vector`` of ``index``: signal it, or leave it pending while masked."""
        ix = self._indexes.get(index)
        v = self._vector(index, vector)
        if ix is None or v is None:
            return
        if v.masked:
            v.pending = True
            return
        if v.fd is None or not _signal(v.fd):
            self.dropped += 1
            return
        self.triggered += 1
        if ix.spec.automasked:
            v.masked = True
            v.pending = True  # a level: it stays up until the function lowers it

    def lower(self, index: int, vector: int) -> None:
        """The function's line went down (level-triggered INTx): nothing is pending."""
        v = self._vector(index, vector)
        if v is not None:
            v.pending = False

    def pending(self, index: int, vector: int) -> bool:
        v = self._vector(index, vector)
        return v is not None and v.pending

    def _vector(self, index: int, vector: int) -> Vector | None:
        ix = self._indexes.get(index)
        if ix is None or not 0 <= vector < len(ix.vectors):
            return None
        return ix.vectors[vector]

    # -- the client's side: DEVICE_SET_IRQS ---------------------------------------------

    def set_irqs(self, req: SetIrqs, fds: list[int]) -> None:
        """Apply DEVICE_SET_IRQS. On success the table owns ``fds``; on a refusal the
        caller still does.

        :raise CommandError: for an unknown index, vectors beyond it, or fds that do not
            match the request.
        """
        ix = self._indexes.get(req.index)
        if ix is None or not ix.spec.count:
            raise CommandError(f"SET_IRQS: no interrupt index {req.index}")
        if req.start + req.count > ix.spec.count:
            raise CommandError(
                f"SET_IRQS: vectors {req.start}+{req.count} beyond index {req.index}'s "
                f"{ix.spec.count}"
            )
        kind, action = req.data_type, req.action
        if fds and kind is not IrqSetFlag.DATA_EVENTFD:
            raise CommandError(f"SET_IRQS: {len(fds)} fds without DATA_EVENTFD")
        if kind is IrqSetFlag.DATA_EVENTFD and fds and len(fds) != req.count:
            raise CommandError(f"SET_IRQS: {len(fds)} fds for {req.count} vectors")
        if kind is IrqSetFlag.DATA_EVENTFD and action is IrqSetFlag.ACTION_MASK:
            raise CommandError("SET_IRQS: mask eventfds are not supported")
        for fd in fds:
            # Only eventfds: a pipe whose writer is gone is readable for ever, and an
            # unmask watch on it would spin the loop (and re-fire INTx) without end.
            if not _is_eventfd(fd):
                raise CommandError(f"SET_IRQS: fd {fd} is not an eventfd")
            try:
                os.set_blocking(fd, False)
            except OSError as err:
                raise CommandError(f"SET_IRQS: fd {fd} is not usable: {err}") from None
        if kind is IrqSetFlag.DATA_BOOL:
            picked = [req.start + i for i, b in enumerate(req.data) if b]
        else:
            picked = list(range(req.start, req.start + req.count))
        if action is IrqSetFlag.ACTION_TRIGGER:
            self._trigger_action(ix, req, kind, fds, picked)
        elif action is IrqSetFlag.ACTION_MASK:
            for n in picked:
                ix.vectors[n].masked = True
        else:
            self._unmask_action(ix, req, kind, fds, picked)

    def _trigger_action(
        self, ix: _Index, req: SetIrqs, kind: IrqSetFlag, fds: list[int], picked: list[int]
    ) -> None:
        if kind is IrqSetFlag.DATA_EVENTFD:
            # fds for the vectors, or none: de-assign them. Either way the index is on.
            for i, n in enumerate(range(req.start, req.start + req.count)):
                v = ix.vectors[n]
                _close(v.fd)
                v.fd = fds[i] if fds else None
            ix.enabled = True
        elif kind is IrqSetFlag.DATA_NONE and req.count == 0:
            self._disable(ix)
        else:
            for n in picked:  # a loopback test of the vectors
                self.trigger(req.index, n)

    def _unmask_action(
        self, ix: _Index, req: SetIrqs, kind: IrqSetFlag, fds: list[int], picked: list[int]
    ) -> None:
        if kind is IrqSetFlag.DATA_EVENTFD:
            vectors = range(req.start, req.start + req.count)
            if fds:
                # Watch every new fd before the table takes any: an fd the event loop
                # cannot poll (a regular file: EPERM) is a refused request with the table
                # unchanged and the fds still the caller's to close, not an internal error
                # that drops the connection and then closes those fd numbers a second time.
                self._watch_all(
                    [
                        (fds[i], functools.partial(self._on_unmask_fd, req.index, n))
                        for i, n in enumerate(vectors)
                    ]
                )
            for i, n in enumerate(vectors):
                v = ix.vectors[n]
                self._drop_unmask_fd(v)
                if fds:
                    v.unmask_fd = fds[i]
            return
        for n in picked:
            self.unmask(req.index, n)

    def unmask(self, index: int, vector: int) -> None:
        """Unmask ``vector``; one that is still pending fires now."""
        v = self._vector(index, vector)
        if v is None:
            return
        v.masked = False
        if v.pending:
            v.pending = False
            self.trigger(index, vector)

    def _on_unmask_fd(self, index: int, vector: int) -> None:
        v = self._vector(index, vector)
        if v is None or v.unmask_fd is None:
            return
        try:
            os.eventfd_read(v.unmask_fd)
        except BlockingIOError:
            return  # a spurious wake-up: nothing was signalled
        except OSError as err:
            # Not readable as an eventfd any more: stop watching rather than spin on it.
            log.warning("vfio-user: unmask fd of irq %d.%d dropped: %s", index, vector, err)
            self._drop_unmask_fd(v)
            return
        self.unmask(index, vector)

    def _watch_all(self, watches: list[tuple[int, Callable[[], None]]]) -> None:
        """Watch each fd, or none of them.

        :raise CommandError: if one cannot be watched.
        """
        if self._watch is None:
            return
        done: list[int] = []
        try:
            for fd, callback in watches:
                self._watch(fd, callback)
                done.append(fd)
        except OSError as err:
            if self._unwatch is not None:
                for fd in done:
                    self._unwatch(fd)
            raise CommandError(f"SET_IRQS: unmask fd cannot be watched: {err}") from None

    def _drop_unmask_fd(self, v: Vector) -> None:
        if v.unmask_fd is not None:
            if self._unwatch is not None:
                self._unwatch(v.unmask_fd)
            _close(v.unmask_fd)
            v.unmask_fd = None

    def _disable(self, ix: _Index) -> None:
        for v in ix.vectors:
            _close(v.fd)
            self._drop_unmask_fd(v)
            v.fd = None
            v.masked = v.pending = False
        ix.enabled = False

    def close(self) -> None:
        """Close every eventfd (the client went away)."""
        for ix in self._indexes.values():
            self._disable(ix)


def _is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (the only kind of fd SET_IRQS takes)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False
