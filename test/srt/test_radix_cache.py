"""RadixCache: matching, splitting, inserting, locking and LRU eviction, against a real allocator."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang.srt.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
from sglang.srt.mem_cache.radix_cache import RadixCache


def make(size: int = 64, disable: bool = False) -> RadixCache:
    return RadixCache(ReqToTokenPool(4, 64, "cpu"), TokenToKVPoolAllocator(size, "cpu"), disable=disable)


def put(cache: RadixCache, key: list[int]) -> torch.Tensor:
    """Allocate slots for `key` and insert it; frees duplicates like the scheduler does."""
    slots = cache.allocator.alloc(len(key))
    already = cache.insert(key, slots)
    cache.allocator.free(slots[:already])
    return slots


def test_match_on_empty_and_disabled():
    c = make()
    slots, node = c.match_prefix([1, 2, 3])
    assert slots.numel() == 0 and node is c.root
    d = make(disable=True)
    put(d, [1, 2, 3])
    assert d.match_prefix([1, 2])[0].numel() == 0


def test_insert_and_match_prefixes_with_split():
    c = make()
    s1 = put(c, [1, 2, 3, 4, 5])
    slots, node = c.match_prefix([1, 2, 3, 9])
    assert slots.tolist() == s1[:3].tolist()
    assert node.key == [1, 2, 3]  # the edge was split at the mismatch
    assert c.match_prefix([1, 2, 3, 4, 5, 6])[0].tolist() == s1.tolist()
    s2 = put(c, [1, 2, 3, 7, 8])
    assert c.match_prefix([1, 2, 3, 7, 8])[0].tolist() == s1[:3].tolist() + s2[3:].tolist()
    assert c.total_size() == 7 and c.evictable_size() == 7
    # Inserting an existing key reports it fully present.
    dup = c.allocator.alloc(5)
    assert c.insert([1, 2, 3, 4, 5], dup) == 5
    c.allocator.free(dup)


def test_lock_protects_from_eviction_and_lru_order():
    c = make(size=20)
    put(c, [1, 2, 3, 4])
    put(c, [5, 6, 7, 8])
    put(c, [9, 10, 11, 12])
    _, node = c.match_prefix([5, 6, 7, 8])  # touch: most recently used
    c.inc_lock_ref(node)
    assert c.protected_size() == 4 and c.evictable_size() == 8
    free_before = c.allocator.available_size()
    assert c.evict(4) == 4
    assert c.match_prefix([1, 2, 3, 4])[0].numel() == 0  # least recently used went first
    assert c.match_prefix([9, 10, 11, 12])[0].numel() == 4
    assert c.evict(100) == 4  # everything unlocked
    assert c.match_prefix([5, 6, 7, 8])[0].numel() == 4  # locked survives
    assert c.allocator.available_size() == free_before + 8
    c.dec_lock_ref(node)
    assert c.evictable_size() == 4 and c.protected_size() == 0
    c.evict(4)
    assert c.total_size() == 0 and c.allocator.available_size() == 20


def test_evicting_a_leaf_makes_its_parent_evictable():
    c = make()
    put(c, [1, 2, 3, 4])
    put(c, [1, 2, 5, 6])  # splits into [1,2] -> {[3,4], [5,6]}
    assert c.evict(6) == 6
    assert c.total_size() == 0 and c.allocator.available_size() == 64


def test_cache_finished_req_moves_kv_into_tree_and_frees_duplicates():
    c = make()
    pool = c.req_to_token_pool
    shared = put(c, [1, 2, 3])
    prefix, node = c.match_prefix([1, 2, 3, 4])
    c.inc_lock_ref(node)
    row = pool.alloc()
    own = c.allocator.alloc(3)
    pool.req_to_token[row, :3] = prefix
    pool.req_to_token[row, 3:6] = own
    # Meanwhile another request cached [1, 2, 3, 4].
    other = put(c, [1, 2, 3, 4])
    req = SimpleNamespace(req_pool_idx=row, kv_len=6, prefix_indices=prefix, last_node=node, fill_ids=[1, 2, 3, 4, 5, 6, 99])
    free_before = c.allocator.available_size()
    c.cache_finished_req(req)
    assert c.allocator.available_size() == free_before + 1  # our slot for token 4 was a duplicate
    assert c.match_prefix([1, 2, 3, 4, 5, 6])[0].tolist() == shared.tolist() + [other[3].item()] + own[1:].tolist()
    assert c.protected_size() == 0 and pool.available_size() == 4
