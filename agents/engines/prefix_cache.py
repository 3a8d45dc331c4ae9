"""A KV cache of recent sequences for the HF engine, so a prompt that extends one it has seen
(the next turn of an episode: prompt + reply + observation; a fork: its parent's prompt) is
prefilled only from where they part.

Entries are whole sequences (prompt + the reply tokens whose KV was computed) with their per-layer
keys and values; a lookup returns the longest common prefix with any entry. KV at position t
depends only on tokens <= t (causal attention), so any prefix of an entry's KV is exact for any
prompt that shares it. Least recently used entries go first once the byte budget is full.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def lookup(self, tokens: list[int], limit: int) -> tuple[int, torch.Tensor | None]:
        """(n, kv): the longest cached prefix of `tokens`, at most `limit` long, and its KV
        [layers, 2, kv_heads, n, head_dim] (None when n == 0)."""
        best, best_key = 0, None
        query = torch.tensor(tokens[:limit], dtype=torch.int32)
        for key, (ids, _) in self._entries.items():
            n = min(len(ids), len(query))
            if n <= best:
                continue
            same = ids[:n] == query[:n]
            common = n if bool(same.all()) else int(same.to(torch.int8).argmin())
            if common > best:
                best, best_key = common, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key][1][:, :, :, :best]

    def store(self, tokens: list[int], kv: torch.Tensor) -> None:
        """Keep `kv` ([layers, 2, kv_heads, len(tokens), head_dim]) for `tokens`. Entries that are
        prefixes of `tokens` are dropped: the new one answers every lookup they would."""
        key = tuple(tokens)
        if not key or kv.nbytes > self.max_bytes:
            return
        ids = torch.tensor(key, dtype=torch.int32)
        for other in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(other)
        self._entries[key] = (ids, kv)
        self._bytes += kv.nbytes
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        self._bytes -= self._entries.pop(key)[1].nbytes
