"""What each client (an API key's identity) holds of something bounded, against its share."""

from __future__ import annotations

from collections import Counter


class Holdings:
    """Counts by client, each to stay within `share` (0: no shares, and callers count
    nothing). A client that holds nothing is forgotten, so that the counts grow with the
    clients being served, not with every client ever seen."""

    def __init__(self, share: int = 0) -> None:
        self.share = share
        self._by_client: Counter[str] = Counter()

    def allows(self, client: str, n: int = 1) -> bool:
        """Whether `client` may take `n` more within its share."""
        return self._by_client[client] + n <= self.share

    def add(self, client: str, n: int) -> None:
        self._by_client[client] += n
        if not self._by_client[client]:
            del self._by_client[client]

    def as_dict(self) -> dict[str, int]:
        return dict(self._by_client)
