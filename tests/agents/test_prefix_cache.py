"""PrefixCache (agents/engines/prefix_cache.py): longest-common-prefix lookup, dominance, LRU.

KV tensors here are [layers=1, 2, heads=1, n, head_dim=1] holding each position's token id, so a
returned slice shows which positions it came from."""

import torch

from agents.engines.prefix_cache import PrefixCache


def kv_of(tokens):
    t = torch.tensor(tokens, dtype=torch.float32).view(1, 1, 1, -1, 1)
    return torch.cat([t, -t], dim=1)


def test_lookup_returns_the_longest_common_prefix_within_the_limit():
    cache = PrefixCache(max_bytes=1 << 20)
    cache.store([1, 2, 3, 4, 5], kv_of([1, 2, 3, 4, 5]))
    cache.store([1, 2, 9], kv_of([1, 2, 9]))
    n, kv = cache.lookup([1, 2, 3, 7, 8], limit=4)
    assert n == 3 and kv[0, 0, 0, :, 0].tolist() == [1, 2, 3] and kv[0, 1, 0, :, 0].tolist() == [-1, -2, -3]
    assert cache.lookup([1, 2, 3, 4, 5, 6], limit=2)[0] == 2  # the last prompt token must still run
    assert cache.lookup([1, 2, 9, 9], limit=3)[0] == 3
    assert cache.lookup([5, 1, 2], limit=2) == (0, None)


def test_an_entry_that_is_a_prefix_of_a_new_one_is_dropped():
    cache = PrefixCache(max_bytes=1 << 20)
    cache.store([1, 2], kv_of([1, 2]))
    cache.store([1, 3], kv_of([1, 3]))
    cache.store([1, 2, 3, 4], kv_of([1, 2, 3, 4]))
    assert len(cache) == 2  # [1, 2] went: [1, 2, 3, 4] answers everything it did
    assert cache.nbytes == kv_of([1, 3]).nbytes + kv_of([1, 2, 3, 4]).nbytes


def test_least_recently_used_goes_first_when_full():
    entry = kv_of([0, 0, 0]).nbytes
    cache = PrefixCache(max_bytes=2 * entry)
    cache.store([1, 1, 1], kv_of([1, 1, 1]))
    cache.store([2, 2, 2], kv_of([2, 2, 2]))
    cache.lookup([1, 1, 1, 5], limit=3)  # touch [1, 1, 1]: [2, 2, 2] is now the oldest
    cache.store([3, 3, 3], kv_of([3, 3, 3]))
    assert cache.lookup([2, 2, 2, 5], limit=3)[0] == 0
    assert cache.lookup([1, 1, 1, 5], limit=3)[0] == 3 and cache.lookup([3, 3, 3, 5], limit=3)[0] == 3
    assert cache.nbytes == 2 * entry
    cache.store(list(range(9)), kv_of(list(range(9))))  # larger than the whole budget: not kept
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
