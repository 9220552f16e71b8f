"""Fixtures for protocol tests: a backend thread on a socket in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.protocol.vhost_rig import BackendThread


@pytest.fixture
def sock_path(tmp_path) -> str:
    return str(tmp_path / "vballoon.sock")


@pytest.fixture
def backend(sock_path: str) -> Iterator[BackendThread]:
    b = BackendThread(sock_path)
    yield b
    b.stop()
