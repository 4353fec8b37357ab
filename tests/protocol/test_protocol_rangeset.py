from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.protocol.rangeset import RangeSet

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 300), st.integers(0, 40)),
        st.tuples(st.just("one"), st.integers(0, 340), st.just(0)),
    ),
    max_size=60,
)


def model_ranges(model: set[int]) -> list[tuple[int, int]]:
    result: list[tuple[int, int]] = []
    for value in sorted(model):
        if result and result[-1][1] == value:
            result[-1] = (result[-1][0], value + 1)
        else:
            result.append((value, value + 1))
    return result


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(0, 360), st.integers(0, 360), st.integers(1, 5))
def test_matches_a_set_model(ops: list[tuple[str, int, int]], a: int, b: int, limit: int) -> None:
    ranges, model = RangeSet(), set[int]()
    for kind, start, length in ops:
        if kind == "add":
            added = ranges.add(start, start + length)
            new = set(range(start, start + length)) - model
        else:
            added = int(ranges.add_one(start))
            new = {start} - model
        assert added == len(new)
        model |= new
    assert ranges.ranges() == model_ranges(model)
    assert len(ranges) == ranges.covered == len(model)
    for probe in range(0, 362):
        assert (probe in ranges) == (probe in model)
    assert ranges.first_gap_from(a) == min(x for x in range(a, 1000) if x not in model)
    start, end = min(a, b), max(a, b)
    gaps = model_ranges(set(range(start, end)) - model)
    assert ranges.missing(start, end) == gaps
    assert ranges.missing(start, end, limit) == gaps[:limit]
    above = model_ranges({x for x in model if x >= a})
    assert ranges.ranges_from(a) == above
    assert ranges.ranges_from(a, limit) == above[:limit]


def test_ten_million_blocks_with_few_holes_is_cheap() -> None:
    ranges = RangeSet()
    holes = set(range(5, 10_000_000, 100_003))
    step = 1000
    for start in range(0, 10_000_000, step):
        ranges.add(start, start + step)  # bulk, as a cumulative ack would
    assert ranges.range_count == 1
    for block in range(10_000_000, 10_050_000):
        ranges.add_one(block)  # the per-datagram path stays O(1) in order
    fresh = RangeSet()
    previous = 0
    for hole in sorted(holes):
        fresh.add(previous, hole)
        previous = hole + 1
    fresh.add(previous, 10_000_000)
    assert fresh.covered == 10_000_000 - len(holes)
    assert fresh.range_count == len(holes) + 1
    assert [gap[0] for gap in fresh.missing(0, 10_000_000)] == sorted(holes)
    assert 6 in fresh and 5 not in fresh
    assert fresh.first_gap_from(0) == 5


def test_empty_and_degenerate() -> None:
    ranges = RangeSet()
    assert ranges.add(5, 5) == 0
    assert ranges.first() is None and ranges.end() is None
    assert "x" not in ranges
    assert ranges.missing(3, 3) == []
    assert RangeSet([(1, 3), (3, 5)]).ranges() == [(1, 5)]
