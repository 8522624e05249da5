"""The readers under fuzzing (hypothesis), a few seconds each: any malformed COCO JSON, VOC XML,
YOLO label file or mask image ends in a clean result or one DetfitError line, never another
exception or a hang. benchmarks/fuzz_readers.py runs the same properties for minutes."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from fuzz_readers import READERS, fuzz  # noqa: E402


@pytest.mark.parametrize("reader", list(READERS))
def test_reader_survives_malformed_inputs(reader):
    outcomes = fuzz(reader, max_examples=100)
    assert sum(outcomes.values()) >= 100
    # the generators reach past the reader: some inputs pass the check and build every target
    assert outcomes["ok"] > 0


def test_fuzzing_catches_a_reader_that_raises(monkeypatch):
    """The property can fail: a reader bug (here, a KeyError) surfaces as a hypothesis failure."""
    import fuzz_readers

    def broken(*args, **kwargs):
        raise KeyError("id")

    monkeypatch.setattr(fuzz_readers, "read_coco", broken)
    with pytest.raises(KeyError):
        fuzz("coco", max_examples=5, shrink=False)


def test_fuzzing_interrupts_a_reader_that_hangs(monkeypatch):
    import time

    import fuzz_readers

    monkeypatch.setattr(fuzz_readers, "read_coco", lambda *a, **k: time.sleep(60))
    with pytest.raises(fuzz_readers.Hang):
        fuzz("coco", max_examples=1, deadline_s=0.1, shrink=False)
