"""``vballoon bench soak`` at its full size: the process does not grow in memory, fds or
mappings over 10,000 inflate/deflate cycles, 1,000 connections and 1,000 control sessions."""

from __future__ import annotations

import json

import pytest

from vballoon.cli import main


def test_soak_full_size(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "soak", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"rss_growth_kib", "fd_growth", "maps_growth", "machine"}
    assert result["work"] == {"cycles": 10_000, "connects": 1_000, "sessions": 1_000}
    assert result["fd_growth"] <= 0, result
    assert result["maps_growth"] <= 0, result
    assert result["rss_growth_kib"] <= 4096, result
    assert code == 0
