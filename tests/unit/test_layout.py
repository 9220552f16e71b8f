"""Queue layout for every combination of the optional queue features."""

import itertools

import pytest

from device import BalloonConfig, BalloonDevice, ConfigError, Feature, Queue, queue_layout
from device.testing import RecordingInterrupts

OPTIONAL = [
    (Feature.STATS_VQ, Queue.STATS),
    (Feature.FREE_PAGE_HINT, Queue.FREE_PAGE),
    (Feature.REPORTING, Queue.REPORTING),
    (Feature.RANGE_REPORT, Queue.RANGE_REPORT),
]


@pytest.mark.parametrize("present", list(itertools.product([0, 1], repeat=len(OPTIONAL))))
def test_layout_compacts_absent_queues(present: tuple[int, ...]) -> None:
    features = Feature.VERSION_1
    expect = {Queue.INFLATE: 0, Queue.DEFLATE: 1}
    nxt = 2
    for on, (bit, q) in zip(present, OPTIONAL, strict=True):
        if on:
            features |= bit
            expect[q] = nxt
            nxt += 1
    layout = queue_layout(features)
    assert len(layout) == nxt
    for q in Queue:
        assert layout.index(q) == expect.get(q)
        if q in expect:
            assert layout.queue_at(expect[q]) is q
    assert layout.queue_at(nxt) is None


def test_spec_digest_table() -> None:
    """The table in shared/spec/balloon.md section 4."""
    v = Feature.VERSION_1
    assert queue_layout(v | Feature.STATS_VQ | Feature.REPORTING).index(Queue.REPORTING) == 3
    assert queue_layout(v | Feature.REPORTING).index(Queue.REPORTING) == 2
    full = queue_layout(v | Feature.STATS_VQ | Feature.FREE_PAGE_HINT | Feature.REPORTING)
    assert full.index(Queue.REPORTING) == 4
    assert queue_layout(v | Feature.FREE_PAGE_HINT | Feature.REPORTING).index(Queue.FREE_PAGE) == 2


@pytest.mark.parametrize("present", list(itertools.product([0, 1], repeat=len(OPTIONAL))))
def test_device_layout_follows_negotiation(present: tuple[int, ...]) -> None:
    dev = BalloonDevice(BalloonConfig(), RecordingInterrupts())
    features = Feature.VERSION_1
    for on, (bit, _) in zip(present, OPTIONAL, strict=True):
        if on:
            features |= bit
    dev.negotiate(features)
    assert dev.layout == queue_layout(features)
    with pytest.raises(ConfigError):
        dev.start_queue(len(dev.layout), None)  # type: ignore[arg-type]


def test_switched_off_features_are_not_offered() -> None:
    cfg = BalloonConfig(
        stats=False,
        reporting=False,
        free_page_hint=False,
        range_report=False,
        deflate_on_oom=False,
        page_poison=False,
        must_tell_host=False,
    )
    dev = BalloonDevice(cfg, RecordingInterrupts())
    assert dev.offered_features & 0xFFFFFF == 0
    assert dev.offered_features & Feature.VERSION_1
    assert dev.layout.queues == (Queue.INFLATE, Queue.DEFLATE)
    assert dev.config_size == 8
    with pytest.raises(ConfigError):
        dev.negotiate(Feature.VERSION_1 | Feature.STATS_VQ)
