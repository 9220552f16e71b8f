"""Fixtures for protocol tests: a backend thread on a socket in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.protocol.vfio_rig import ServerThread, connect
from tests.protocol.vhost_rig import BackendThread
from vfio_user.client import VfioUserClient


@pytest.fixture
def sock_path(tmp_path) -> str:
    return str(tmp_path / "vballoon.sock")


@pytest.fixture
def backend(sock_path: str) -> Iterator[BackendThread]:
    b = BackendThread(sock_path)
    yield b
    b.stop()


# -- vfio-user ------------------------------------------------------------------------


@pytest.fixture
def vfio_path(tmp_path) -> str:
    return str(tmp_path / "vfio-user.sock")


@pytest.fixture
def vfio_server(vfio_path: str) -> Iterator[ServerThread]:
    """The vfio-user server with the virtio-pci balloon function on a thread; after the
    test it must still be alive (no bad client may take the process down)."""
    s = ServerThread(vfio_path)
    yield s
    assert s.alive, "the server's loop died"
    s.stop()


@pytest.fixture
def vfio_client(vfio_server: ServerThread) -> Iterator[VfioUserClient]:
    """A client that has sent VERSION with QEMU 11.1's capabilities."""
    c = connect(vfio_server)
    c.version()
    yield c
    c.close()
