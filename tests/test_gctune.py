"""kvha.gctune: the collector settings a node applies once it is built."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kvha.gctune import YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    if hasattr(gc, "unfreeze"):
        gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.skipif(not hasattr(gc, "freeze"), reason="CPython's generational collector only")
def test_tune_gc_freezes_start_up_objects_and_collects_young_ones_less_often(
    restore_gc: None,
) -> None:
    survivor = [object() for _ in range(10)]  # alive at "start-up"
    _, middle, old = gc.get_threshold()
    assert tune_gc() is True
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, old)
    assert gc.get_freeze_count() >= len(survivor)
    gc.collect()
    assert gc.get_freeze_count() >= len(survivor)  # frozen objects stay out of collections


@pytest.mark.skipif(hasattr(gc, "freeze"), reason="PyPy: nothing to tune")
def test_tune_gc_does_nothing_without_generations() -> None:
    assert tune_gc() is False
