"""Which prefill requests a prefill worker hands its engine now, and which wait for decode's
page list (pure: no I/O). Runs inside each prefill worker; docs/disaggregation.md.
"""

from __future__ import annotations


class PrefillGate:
    """A room is *listed* once decode's page list is here (decode reserved its pages),
    *unlisted* before. A listed room is computed and sent without waiting on decode's pool,
    so its prefill pages always come back. An unlisted room, once computed, holds its pages
    until decode lists it, which may wait on decode pages held by rooms this prefill cannot
    compute for want of those very pages. So unlisted rooms run only while the pages they
    hold or will take stay within `num_total_pages - max_request_pages` (the most any
    accepted request can need): once listed rooms let theirs go, the pool has room for any
    one request, so every listed room, and the oldest parked one, eventually runs. A pool no
    bigger than one request runs listed rooms only (as SGLang does)."""

    def __init__(self, num_total_pages: int, max_request_pages: int):
        self.eager_limit_pages = num_total_pages - min(num_total_pages, max_request_pages)
        self.unlisted_pages: dict[int, int] = {}  # room -> pages, unlisted rooms in the engine
        self.parked_pages: dict[int, int] = {}  # room -> pages, in arrival order
        self.parked_listed: set[int] = set()  # parked rooms whose page list came since

    @property
    def num_parked(self) -> int:
        return len(self.parked_pages)

    @property
    def num_unlisted_pages(self) -> int:
        return sum(self.unlisted_pages.values())

    def is_parked(self, room: int) -> bool:
        return room in self.parked_pages

    def park(self, room: int, num_pages: int, listed: bool) -> None:
        """A new request for `room` that needs `num_pages`; `release` says when it runs."""
        self.parked_pages[room] = num_pages
        if listed:
            self.parked_listed.add(room)

    def on_listed(self, room: int) -> None:
        """Decode's page list for `room` came: its pages leave the eager budget."""
        self.unlisted_pages.pop(room, None)
        if room in self.parked_pages:
            self.parked_listed.add(room)

    def drop(self, room: int) -> None:
        """The room ended (sent, failed, forgotten): it holds nothing of the budget."""
        self.unlisted_pages.pop(room, None)
        self.parked_pages.pop(room, None)
        self.parked_listed.discard(room)

    def release(self) -> list[int]:
        """Parked rooms to compute now, in arrival order: every listed one; unlisted ones
        while they fit the eager budget, the first that does not holding back those after it
        (none overtakes the oldest)."""
        if not self.parked_pages:  # the common case, every turn of the worker loop
            return []
        released: list[int] = []
        num_pages = self.num_unlisted_pages
        held_back = False
        for room, room_pages in self.parked_pages.items():
            if room in self.parked_listed:
                released.append(room)
            elif not held_back and num_pages + room_pages <= self.eager_limit_pages:
                num_pages += room_pages
                self.unlisted_pages[room] = room_pages
                released.append(room)
            elif not self.parked_listed:
                break  # held back, and no listed room behind it
            else:
                held_back = True
        for room in released:
            del self.parked_pages[room]
            self.parked_listed.discard(room)
        return released
