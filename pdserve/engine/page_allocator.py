"""Free-list of KV page ids with exact accounting (pure: no torch). Runs in each worker."""

from __future__ import annotations


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages <= 0:
            raise ValueError(f"num_pages must be > 0, got {num_pages}")
        self.num_pages = num_pages
        # Popping from the end hands out low ids first, which keeps tests readable.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def alloc(self, num_pages: int) -> list[int] | None:
        """`num_pages` page ids, or None (and nothing taken) if fewer are free."""
        if num_pages < 0:
            raise ValueError(f"cannot allocate {num_pages} pages")
        if num_pages > len(self._free):
            return None
        page_ids = [self._free.pop() for _ in range(num_pages)]
        self._used.update(page_ids)
        return page_ids

    def free(self, page_ids: list[int]) -> None:
        """Return pages; a page that is not in use (double free, foreign id) raises and
        nothing is freed, so accounting never drifts."""
        bad = [p for p in page_ids if p not in self._used]
        if bad or len(set(page_ids)) != len(page_ids):
            raise ValueError(f"freeing pages that are not in use: {bad or page_ids}")
        self._used.difference_update(page_ids)
        self._free.extend(reversed(page_ids))
