"""A set of integers kept as sorted, disjoint, half-open ranges ``[start, end)``.

Block numbers of a transfer are mostly contiguous with a few holes, so ten million received
blocks with a hundred holes cost a hundred ranges. Two parallel lists (starts and ends) keep
``bisect`` on plain ints, which is much faster than bisecting tuples.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator

Range = tuple[int, int]


class RangeSet:
    __slots__ = ("_starts", "_ends", "_count")

    def __init__(self, ranges: list[Range] | None = None) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._count = 0
        for start, end in ranges or ():
            self.add(start, end)

    # --- mutation ------------------------------------------------------------------

    def add(self, start: int, end: int) -> int:
        """Add ``[start, end)``; returns how many integers were not in the set before."""
        if end <= start:
            return 0
        starts, ends = self._starts, self._ends
        # Fast path for the common in-order case: extend or append after the last range.
        if ends and start == ends[-1]:
            ends[-1] = end
            self._count += end - start
            return end - start
        if not ends or start > ends[-1]:
            starts.append(start)
            ends.append(end)
            self._count += end - start
            return end - start
        # Ranges that overlap or touch [start, end) are merged into one.
        first = bisect_left(ends, start)
        last = bisect_right(starts, end)
        if first == last:
            starts.insert(first, start)
            ends.insert(first, end)
            self._count += end - start
            return end - start
        merged_start = min(start, starts[first])
        merged_end = max(end, ends[last - 1])
        already = 0
        for index in range(first, last):
            already += ends[index] - starts[index]
        starts[first:last] = [merged_start]
        ends[first:last] = [merged_end]
        added = (merged_end - merged_start) - already
        self._count += added
        return added

    def add_one(self, value: int) -> bool:
        """Add one integer; returns True if it was new."""
        ends = self._ends
        if ends and ends[-1] == value:  # in-order arrival: grow the last range
            ends[-1] = value + 1
            self._count += 1
            return True
        return self.add(value, value + 1) == 1

    # --- queries -------------------------------------------------------------------

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        ends = self._ends
        if not ends or value >= ends[-1]:
            return False  # the usual case for a new block: above everything held
        index = bisect_right(self._starts, value) - 1
        return index >= 0 and value < self._ends[index]

    def __len__(self) -> int:
        return self._count

    @property
    def covered(self) -> int:
        """How many integers the set holds."""
        return self._count

    @property
    def range_count(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[Range]:
        return zip(self._starts, self._ends, strict=True)

    def __repr__(self) -> str:
        return f"RangeSet({self.ranges()!r})"

    def ranges(self) -> list[Range]:
        return list(zip(self._starts, self._ends, strict=True))

    def first(self) -> int | None:
        return self._starts[0] if self._starts else None

    def end(self) -> int | None:
        """One past the highest member, or None when empty."""
        return self._ends[-1] if self._ends else None

    def first_gap_from(self, value: int) -> int:
        """The smallest integer ``>= value`` that is not in the set."""
        ends = self._ends
        if ends and self._starts[-1] <= value < ends[-1]:
            return ends[-1]  # in the last range: the usual case as blocks arrive in order
        index = bisect_right(self._starts, value) - 1
        if index >= 0 and value < self._ends[index]:
            return self._ends[index]
        return value

    def ranges_from(self, value: int, limit: int | None = None) -> list[Range]:
        """Ranges (clipped) that hold integers ``>= value``, at most ``limit`` of them."""
        starts, ends = self._starts, self._ends
        index = bisect_right(ends, value)
        stop = len(starts) if limit is None else min(len(starts), index + limit)
        result = list(zip(starts[index:stop], ends[index:stop], strict=True))
        if result and result[0][0] < value:
            result[0] = (value, result[0][1])
        return result

    def missing(self, start: int, end: int, limit: int | None = None) -> list[Range]:
        """The gaps of the set inside ``[start, end)``, at most ``limit`` of them."""
        gaps: list[Range] = []
        if end <= start:
            return gaps
        starts, ends = self._starts, self._ends
        cursor = start
        index = bisect_right(ends, start)
        while cursor < end and (limit is None or len(gaps) < limit):
            if index >= len(starts) or starts[index] >= end:
                gaps.append((cursor, end))
                break
            if starts[index] > cursor:
                gaps.append((cursor, starts[index]))
            cursor = max(cursor, ends[index])
            index += 1
        return gaps
