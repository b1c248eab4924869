"""What each client (an API key's identity) holds of something bounded, for its share."""

from __future__ import annotations

from collections import Counter


class Holdings:
    """Counts by client. A client that holds nothing is forgotten, so that the counts grow
    with the clients being served, not with every client ever seen."""

    def __init__(self) -> None:
        self._by_client: Counter[str] = Counter()

    def of(self, client: str) -> int:
        return self._by_client[client]

    def add(self, client: str, n: int) -> None:
        self._by_client[client] += n
        if not self._by_client[client]:
            del self._by_client[client]

    def as_dict(self) -> dict[str, int]:
        return dict(self._by_client)
