"""Prefix cache: a radix tree from token-id prefixes to the KV slots that hold them.

Each edge carries a run of token ids and the KV slots of those tokens. Running requests lock the path
to their matched prefix (lock_ref), so it cannot be evicted under them; unlocked leaves are evicted
least-recently-used first when the allocator runs dry. Page size is one token.

Requests enter through `match_prefix` (reuse) and leave through `cache_finished_req` (hand their KV to
the tree, freeing the slots the tree already had). With `disable=True` the same calls keep no state,
so the scheduler never branches on whether caching is on.
"""

from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator

_EMPTY = torch.empty((0,), dtype=torch.int64)


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, key: list[int], value: torch.Tensor, parent: "TreeNode | None", lock_ref: int = 0):
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value  # int64 KV slots on CPU, one per token of `key`
        self.lock_ref = lock_ref
        self.last_access = 0

    def __lt__(self, other: "TreeNode") -> bool:  # heap order for LRU eviction
        return self.last_access < other.last_access


def _common_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class RadixCache:
    def __init__(self, req_to_token_pool: "ReqToTokenPool", token_to_kv_pool_allocator: "TokenToKVPoolAllocator", disable: bool = False):
        self.req_to_token_pool = req_to_token_pool
        self.allocator = token_to_kv_pool_allocator
        self.disable = disable
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode([], _EMPTY, None, lock_ref=1)  # the root is never evicted
        self._evictable = 0
        self._protected = 0

    # ------------------------------------------------------------------ queries
    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """KV slots of the longest cached prefix of `key`, and the node where that prefix ends."""
        if self.disable or not key:
            return _EMPTY, self.root
        node, values, now = self.root, [], next(self._clock)
        while key:
            child = node.children.get(key[0])
            if child is None:
                break
            child.last_access = now
            n = _common_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            node, key = child, key[n:]
            if n < len(child.key):
                break
        return (torch.cat(values) if values else _EMPTY), node

    # ------------------------------------------------------------------ updates
    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Add key -> slots; returns how many leading tokens were already cached (their slots in
        `value` are now duplicates the caller must free)."""
        node, matched, now = self.root, 0, next(self._clock)
        while key:
            child = node.children.get(key[0])
            if child is None:
                new = TreeNode(list(key), value.to("cpu", torch.int64).clone(), node)
                new.last_access = now
                node.children[key[0]] = new
                self._evictable += len(key)
                return matched
            child.last_access = now
            n = _common_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            matched += n
            node, key, value = child, key[n:], value[n:]
        return matched

    def cache_finished_req(self, req: "Req") -> None:
        """Move a leaving request's KV into the tree (or free it) and release its pool row."""
        row = req.req_pool_idx
        kv = self.req_to_token_pool.req_to_token[row, : req.kv_len].to("cpu", torch.int64)
        num_prefix = len(req.prefix_indices)
        if self.disable:
            self.allocator.free(kv)
        else:
            tokens = req.fill_ids[: req.kv_len]
            already = self.insert(tokens, kv)
            # Slots in [num_prefix, already) duplicate tokens another request cached meanwhile.
            if already > num_prefix:
                self.allocator.free(kv[num_prefix:already])
            self.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(row)
        req.req_pool_idx = None
        req.prefix_indices = _EMPTY
        req.last_node = None

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots of unlocked leaves, least recently used first."""
        if self.disable:
            return 0
        heap = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            node = heapq.heappop(heap)
            self.allocator.free(node.value)
            freed += len(node.value)
            self._evictable -= len(node.value)
            parent = node.parent
            del parent.children[node.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        return freed

    def inc_lock_ref(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    # ------------------------------------------------------------------ internals
    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after its first n tokens; returns the new upper node."""
        upper = TreeNode(child.key[:n], child.value[:n], child.parent, lock_ref=child.lock_ref)
        upper.last_access = child.last_access
        upper.children[child.key[n]] = child
        child.parent.children[child.key[0]] = upper
        child.parent, child.key, child.value = upper, child.key[n:], child.value[n:]
        return upper

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node is not self.root:
                yield node
            stack.extend(node.children.values())

    def pretty(self) -> str:
        lines = []

        def walk(node: TreeNode, depth: int) -> None:
            for child in node.children.values():
                lines.append(f"{'  ' * depth}{child.key} lock={child.lock_ref}")
                walk(child, depth + 1)

        walk(self.root, 0)
        return "\n".join(lines)
