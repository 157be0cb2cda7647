"""Prefix cache: a radix tree from token-id prefixes to the KV slots that hold them.

Each edge carries a run of token ids and the KV slots of those tokens. Running requests lock the path
to their matched prefix (lock_ref), so it cannot be evicted under them; unlocked leaves are evicted
least-recently-used first when the allocator runs dry. Page size is one token.

Requests enter through `match_prefix` (reuse) and leave through `cache_finished_req` (hand their KV to
the tree, freeing the slots the tree already had). With `disable=True` the same calls keep no state,
so the scheduler never branches on whether caching is on.

Hybrid sliding-window pool (`swa_allocator` given): each node also keeps, per token, the swa slot of
that token's sliding-layer KV, or 0 where the request had already freed it (a tombstone: the token
fell out of its window). A cached prefix of length L is only usable if the first new query, at L,
finds the swa KV of its window (positions L - W + 1 .. L - 1) all held, so `match` truncates the
full match to the longest such L' (commonly the end of an earlier turn, or of a retracted request,
where the window is still held).

Locks are split by kind: a running request locks the full slots of its whole prefix path
(`lock_ref`; full layers read all of it) but the swa slots of only the path's last W - 1 tokens
(`swa_lock_ref`; the only sliding keys its queries read from the tree). Every other held swa slot in
the tree is evictable: `evict(full, swa)` first removes unlocked leaves LRU (freeing both kinds), then
tombstones swa slots of swa-unlocked nodes LRU, keeping each node's last window on a first pass (that
is where later requests resume) and taking it on a second. The tree counts evictable and protected
slots of each kind, so admission can check both pools.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator

_EMPTY = torch.empty((0,), dtype=torch.int64)


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "swa", "swa_held", "lock_ref", "swa_lock_ref", "last_access")

    def __init__(self, key: list[int], value: torch.Tensor, parent: "TreeNode | None", lock_ref: int = 0, swa: torch.Tensor | None = None):
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value  # int64 KV slots on CPU, one per token of `key`
        self.swa = swa  # hybrid pool: int64 swa slots on CPU per token, 0 = freed (tombstone)
        self.swa_held = 0 if swa is None else int((swa != 0).sum())
        self.lock_ref = lock_ref  # full slots: locked by requests whose prefix runs through here
        self.swa_lock_ref = 0  # swa slots: locked by requests whose prefix window ends within W - 1 below
        self.last_access = 0

    def __lt__(self, other: "TreeNode") -> bool:  # heap order for LRU eviction
        return self.last_access < other.last_access


@dataclass
class PrefixMatch:
    """A usable cached prefix: its full slots, its swa slots (hybrid pool; 0 = tombstone) and the
    node where it ends."""

    full: torch.Tensor
    swa: torch.Tensor | None
    node: TreeNode

    def __len__(self) -> int:
        return int(self.full.numel())


def usable_prefix_len(swa: torch.Tensor, window: int) -> int:
    """Largest L <= len(swa) such that swa positions [max(0, L - window + 1), L) are all held: the
    window the query at position L reads, besides its own key."""
    n = int(swa.numel())
    if n == 0:
        return 0
    need = window - 1
    idx = torch.arange(n)
    # last_gap[i]: the last tombstone at or before i (-1 if none).
    last_gap = torch.cummax(torch.where(swa != 0, torch.full_like(idx, -1), idx), 0).values
    valid = last_gap < (idx + 1 - need).clamp(min=0)
    ok = valid.nonzero()
    return int(ok[-1]) + 1 if ok.numel() else 0


def _common_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class RadixCache:
    def __init__(
        self,
        req_to_token_pool: "ReqToTokenPool",
        token_to_kv_pool_allocator: "TokenToKVPoolAllocator",
        disable: bool = False,
        swa_allocator: "TokenToKVPoolAllocator | None" = None,
        sliding_window: int | None = None,
    ):
        if (swa_allocator is None) != (sliding_window is None):
            raise ValueError("a hybrid radix cache needs both swa_allocator and sliding_window")
        self.req_to_token_pool = req_to_token_pool
        self.allocator = token_to_kv_pool_allocator
        self.swa_allocator = swa_allocator
        self.sliding_window = sliding_window
        self.disable = disable
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode([], _EMPTY, None, lock_ref=1, swa=_EMPTY if self.hybrid else None)  # never evicted
        self._evictable = 0
        self._protected = 0
        self._swa_evictable = 0
        self._swa_protected = 0

    @property
    def hybrid(self) -> bool:
        return self.swa_allocator is not None

    # ------------------------------------------------------------------ queries
    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def swa_evictable_size(self) -> int:
        return self._swa_evictable

    def swa_protected_size(self) -> int:
        return self._swa_protected

    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """KV slots of the longest usable cached prefix of `key`, and the node where it ends."""
        m = self.match(key)
        return m.full, m.node

    def match(self, key: list[int]) -> PrefixMatch:
        """The longest cached prefix of `key` that a new request can extend (see module docstring)."""
        full, path = self._match_path(key)
        if not self.hybrid:
            return PrefixMatch(full, None, path[-1] if path else self.root)
        swa = torch.cat([n.swa for n in path]) if path else _EMPTY
        usable = usable_prefix_len(swa, self.sliding_window)
        node = self._node_ending_at(path, usable)
        return PrefixMatch(full[:usable], swa[:usable], node)

    def _node_ending_at(self, path: list[TreeNode], length: int) -> TreeNode:
        """The node on `path` whose prefix is exactly `length` tokens, splitting an edge if needed."""
        start = 0
        for node in path:
            end = start + len(node.key)
            if length == end:
                return node
            if length < end:
                return self._split(node, length - start) if length > start else node.parent
            start = end
        return self.root

    def _match_path(self, key: list[int]) -> tuple[torch.Tensor, list[TreeNode]]:
        """Full slots of the longest cached prefix of `key` and the nodes it runs through."""
        if self.disable or not key:
            return _EMPTY, []
        node, values, path, now = self.root, [], [], next(self._clock)
        while key:
            child = node.children.get(key[0])
            if child is None:
                break
            child.last_access = now
            n = _common_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            path.append(child)
            node, key = child, key[n:]
            if n < len(child.key):
                break
        return (torch.cat(values) if values else _EMPTY), path

    # ------------------------------------------------------------------ updates
    def insert(self, key: list[int], value: torch.Tensor, swa: torch.Tensor | None = None) -> int:
        """Add key -> slots (and swa slots, 0 for freed ones, with the hybrid pool); returns how many
        leading tokens were already cached (their slots in `value`/`swa` are now duplicates the
        caller must free)."""
        if self.hybrid and swa is None:
            raise ValueError("the hybrid radix cache needs the swa slots of inserted tokens")
        node, matched, now = self.root, 0, next(self._clock)
        while key:
            child = node.children.get(key[0])
            if child is None:
                self._add_leaf(node, list(key), value, swa, now)
                return matched
            child.last_access = now
            n = _common_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            matched += n
            node, key, value = child, key[n:], value[n:]
            swa = swa[n:] if swa is not None else None
        return matched

    def _add_leaf(self, parent: TreeNode, key: list[int], value: torch.Tensor, swa: torch.Tensor | None, now: int) -> None:
        swa_cpu = swa.to("cpu", torch.int64).clone() if self.hybrid else None
        new = TreeNode(key, value.to("cpu", torch.int64).clone(), parent, swa=swa_cpu)
        new.last_access = now
        parent.children[key[0]] = new
        self._evictable += len(key)
        self._swa_evictable += new.swa_held

    def cache_finished_req(self, req: "Req") -> None:
        """Move a leaving request's KV into the tree (or free it) and release its pool row."""
        row = req.req_pool_idx
        kv = self.req_to_token_pool.req_to_token[row, : req.kv_len].to("cpu", torch.int64)
        swa = self.req_to_token_pool.req_to_swa_token[row, : req.kv_len].to("cpu", torch.int64) if self.hybrid else None
        num_prefix = len(req.prefix_indices)
        if self.disable:
            self._free_slots(kv, swa)
        else:
            tokens = req.fill_ids[: req.kv_len]
            already = self.insert(tokens, kv, swa)
            # Slots in [num_prefix, already) duplicate tokens another request cached meanwhile.
            if already > num_prefix:
                self._free_slots(kv[num_prefix:already], swa[num_prefix:already] if swa is not None else None)
            self.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(row)
        req.req_pool_idx = None
        req.prefix_indices = _EMPTY
        req.last_node = None
        req.swa_freed_upto = 0

    def _free_slots(self, full: torch.Tensor, swa: torch.Tensor | None) -> None:
        self.allocator.free(full)
        if swa is not None:
            self.swa_allocator.free(swa[swa != 0])

    def evict(self, num_tokens: int, num_swa_tokens: int = 0) -> int:
        """Free at least `num_tokens` full slots (unlocked leaves, least recently used first) and
        `num_swa_tokens` swa slots (those leaves' swa, then tombstones). Returns full slots freed."""
        if self.disable:
            return 0
        heap = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = swa_freed = 0
        while heap and freed < num_tokens:
            node = heapq.heappop(heap)
            self._free_slots(node.value, node.swa)
            freed += len(node.value)
            swa_freed += node.swa_held
            self._evictable -= len(node.value)
            self._swa_evictable -= node.swa_held
            parent = node.parent
            del parent.children[node.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        if self.hybrid and swa_freed < num_swa_tokens:
            self._tombstone_swa(num_swa_tokens - swa_freed)
        return freed

    def _tombstone_swa(self, num_swa_tokens: int) -> int:
        """Free held swa slots of swa-unlocked nodes, LRU; first sparing each node's last window."""
        nodes = sorted((n for n in self._nodes() if n.swa_lock_ref == 0 and n.swa_held), key=lambda n: n.last_access)
        freed = 0
        for keep_tail in (self.sliding_window - 1, 0):
            for node in nodes:
                if freed >= num_swa_tokens:
                    return freed
                freed += self._tombstone(node, len(node.key) - keep_tail)
        return freed

    def _tombstone(self, node: TreeNode, upto: int) -> int:
        if upto <= 0 or not node.swa_held:
            return 0
        head = node.swa[:upto]
        held = head[head != 0]
        self.swa_allocator.free(held)
        node.swa = torch.cat([torch.zeros_like(head), node.swa[upto:]])
        node.swa_held -= held.numel()
        self._swa_evictable -= held.numel()
        return int(held.numel())

    def inc_lock_ref(self, node: TreeNode | None) -> None:
        self._lock_swa_window(node, +1)
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode | None) -> None:
        self._lock_swa_window(node, -1)
        while node is not None and node is not self.root:
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    def _lock_swa_window(self, node: TreeNode | None, delta: int) -> None:
        if not self.hybrid or node is None:
            return
        for n in self._swa_window_nodes(node):
            was_locked = n.swa_lock_ref > 0
            n.swa_lock_ref += delta
            if was_locked != (n.swa_lock_ref > 0):
                moved = n.swa_held if not was_locked else -n.swa_held
                self._swa_evictable -= moved
                self._swa_protected += moved

    def _swa_window_nodes(self, node: TreeNode) -> list[TreeNode]:
        """The nodes holding the last W - 1 tokens of the path ending at `node`. The topmost is split
        at the window's edge, so locking never pins swa slots no query reads; later splits only add
        edges inside, and both halves inherit the lock, so unlocking walks the same tokens."""
        need, nodes = self.sliding_window - 1, []
        while need > 0 and node is not None and node is not self.root:
            if len(node.key) > need:
                self._split(node, len(node.key) - need)  # `node` keeps the lower `need` tokens
            nodes.append(node)
            need -= len(node.key)
            node = node.parent
        return nodes

    # ------------------------------------------------------------------ internals
    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after its first n tokens; returns the new upper node."""
        swa = child.swa
        upper = TreeNode(child.key[:n], child.value[:n], child.parent, lock_ref=child.lock_ref, swa=None if swa is None else swa[:n])
        upper.swa_lock_ref = child.swa_lock_ref
        upper.last_access = child.last_access
        upper.children[child.key[n]] = child
        child.parent.children[child.key[0]] = upper
        child.parent, child.key, child.value = upper, child.key[n:], child.value[n:]
        if swa is not None:  # held counts move with the tokens; the tree totals are unchanged
            child.swa = swa[n:]
            child.swa_held -= upper.swa_held
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
