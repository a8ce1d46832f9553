"""Coalescing arithmetic: reads cover exactly the needed bundles plus the allowed
gap."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_flash.store.format import ALIGN
from mlx_flash.store.manifest import Section
from mlx_flash.store.reader import aligned_extents
from mlx_flash.store.store import neuron_runs, read_bytes, read_chunks


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 2000), min_size=1, max_size=300), st.integers(0, 8))
def test_runs_cover_the_ids_and_at_most_the_gap(ids, gap):
    ids = np.array(sorted(ids))
    runs = neuron_runs(ids, gap)
    covered = np.concatenate([np.arange(a, b) for a, b in runs])
    assert set(ids.tolist()) <= set(covered.tolist())  # every needed neuron is read
    assert covered.tolist() == sorted(
        set(covered.tolist())
    )  # runs are disjoint, sorted
    for a, b in runs:  # each run starts and ends on a needed neuron ...
        assert a in ids and b - 1 in ids
        inside = ids[(ids >= a) & (ids < b)]  # ... and skips at most `gap` at a time
        assert np.all(np.diff(inside) <= gap + 1)
    for (_, b), (a, _) in zip(runs, runs[1:]):  # runs apart are more than `gap` apart
        assert a - b > gap


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 20000)), max_size=40))
def test_extents_are_aligned_and_cover_the_ranges(raw):
    ranges, at = [], 0
    for start, n in sorted(raw):  # sorted, non-overlapping ranges
        start = max(start, at)
        ranges.append((start, n))
        at = start + n
    extents = aligned_extents(ranges)
    for s, e in extents:
        assert s % ALIGN == 0 and e % ALIGN == 0 and s < e
    for (_, e), (s, _) in zip(extents, extents[1:]):
        assert e < s  # merged when touching
    for o, n in ranges:
        assert any(s <= o and o + n <= e for s, e in extents)
    # no extent reads more than the pages its ranges touch
    pages = {p for o, n in ranges for p in range(o // ALIGN, (o + n - 1) // ALIGN + 1)}
    assert sum(e - s for s, e in extents) == len(pages) * ALIGN


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 999), min_size=1, max_size=400, unique=True),
    st.integers(0, 4),
    st.integers(5, 64),
    st.sampled_from([48, 96, 1000]),
)
def test_pieces_keep_the_order_and_each_read_fits(ids, gap, pages, bundle):
    """A layer read through a staging buffer smaller than it: consecutive pieces of
    the ids in their order, each read within the buffer, as large as it allows."""
    sections = [Section(["g"], 0, bundle), Section(["d"], 1000 * bundle, bundle)]
    sections[1].offset += -sections[1].offset % ALIGN
    ids, capacity = np.array(ids), pages * ALIGN
    pieces = read_chunks(sections, ids, gap, capacity)
    assert np.array_equal(np.concatenate(pieces), ids)
    sizes = [read_bytes(sections, p, gap) for p in pieces]
    assert all(size <= capacity for size in sizes)
    if read_bytes(sections, ids, gap) <= capacity:
        assert len(pieces) == 1
    for piece, following in zip(pieces, pieces[1:]):  # none could take one more
        bigger = np.concatenate([piece, following[:1]])
        assert read_bytes(sections, bigger, gap) > capacity


def test_a_piece_holds_a_neuron_at_least():
    sections = [Section(["g"], 0, 4 * ALIGN)]
    with pytest.raises(ValueError, match="one neuron"):
        read_chunks(sections, np.arange(3), 0, 2 * ALIGN)
