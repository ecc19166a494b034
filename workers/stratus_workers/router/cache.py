"""The router's output cache: identical deterministic requests answered from an LRU with a TTL."""

from __future__ import annotations

import collections
import time

from stratus_workers.api import inference_pb2 as pb


def cache_key(request: pb.GenerateRequest, policy: str) -> bytes | None:
    """The key for `request`, or None when its answer is not deterministic (sampling without a seed)."""
    if request.temperature > 0.0 and not request.HasField("seed"):
        return None
    keyed = pb.GenerateRequest()
    keyed.CopyFrom(request)
    keyed.request_id = ""  # the caller's id does not change the answer
    keyed.policy = pb.ROUTING_POLICY_UNSPECIFIED
    return policy.encode() + b"\0" + keyed.SerializeToString(deterministic=True)


class OutputCache:
    """An LRU of serialized responses; entries expire `ttl` seconds after they were stored."""

    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: collections.OrderedDict[bytes, tuple[float, bytes]] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> pb.GenerateResponse | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return pb.GenerateResponse.FromString(entry[1])

    def put(self, key: bytes, response: pb.GenerateResponse) -> None:
        self._entries[key] = (time.monotonic() + self.ttl, response.SerializeToString())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
