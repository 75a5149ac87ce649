"""The logical KV page allocator, with prefix caching by chained content hash.

Pages are ints in `[0, num_pages)`; the physical (sharded) cache arrays live with the model runner.
Every page has a reference count. Pages with no references sit in a free queue ordered least
recently used first: freeing appends at the tail, allocation takes from the head. A free page that
still holds a registered hash stays findable by prefix lookup until allocation reuses it, which
evicts (drops) its hash.

Prefix caching registers a page only when it is full and all its tokens are computed, under the hash
`h_i = H(h_{i-1}, tuple(tokens of page i))` with `h_{-1}` a fixed seed, so equal hashes mean equal
whole prefixes.

Hash algorithms (`hash_algo`):
- `sha256`: SHA-256 over a canonical byte encoding (parent digest, then each token id as a
  little-endian signed 64-bit int). Stable across processes and machines.
- `sha256_cbor`: SHA-256 over canonical CBOR of `[parent, [tokens...]]` when the `cbor2` package is
  installed; otherwise it falls back to `sha256` above (jaxserve adds no dependency for it).
- `builtin`: Python's `hash()` of `(parent, tokens)`. Fast, deterministic for ints, but only 64
  bits, so a collision could (very rarely) alias two different prefixes.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence as SequenceABC

from jaxserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)

HASH_ALGOS = ("sha256", "sha256_cbor", "builtin")
PageHash = bytes | int
HashFn = Callable[[PageHash, tuple[int, ...]], PageHash]

_SHA256_SEED = hashlib.sha256(b"jaxserve.prefix_cache.v1").digest()
_BUILTIN_SEED = 0x6A61787365727665  # "jaxserve"


def _sha256(parent: PageHash, tokens: tuple[int, ...]) -> bytes:
    payload = struct.pack(f"<{len(tokens)}q", *tokens)
    return hashlib.sha256(bytes(parent) + payload).digest()


def _make_hasher(hash_algo: str) -> tuple[HashFn, PageHash]:
    """The hash function and the seed `h_{-1}` for `hash_algo`."""
    if hash_algo == "sha256":
        return _sha256, _SHA256_SEED
    if hash_algo == "sha256_cbor":
        try:
            import cbor2
        except ImportError:
            logger.info("cbor2 is not installed; sha256_cbor prefix hashing falls back to sha256 "
                        "over jaxserve's canonical encoding")
            return _sha256, _SHA256_SEED

        def _sha256_cbor(parent: PageHash, tokens: tuple[int, ...]) -> bytes:
            return hashlib.sha256(cbor2.dumps([parent, list(tokens)], canonical=True)).digest()

        return _sha256_cbor, _SHA256_SEED
    if hash_algo == "builtin":
        return (lambda parent, tokens: hash((parent, tokens))), _BUILTIN_SEED
    raise ValueError(f"hash_algo must be one of {HASH_ALGOS}, got {hash_algo=}")


class BlockManager:
    """Reference-counted KV pages with an LRU free queue and a content-hash prefix cache."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 hash_algo: str = "sha256") -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages=}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size=}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_algo = hash_algo
        self._hash, self._seed = _make_hasher(hash_algo)
        self._ref_counts = [0] * num_pages
        # Least recently used first; values unused. Holds exactly the refcount-0 pages.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self._page_hash: list[PageHash | None] = [None] * num_pages
        self._cached: dict[PageHash, int] = {}
        # seq_id -> chained hashes of the seq's first pages that cache_full_pages has processed.
        self._seq_hashes: dict[int, list[PageHash]] = {}
        # Prefix-cache statistics, in tokens.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- introspection ----------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages with no references, whether or not they still hold a cached hash."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of pages in use (referenced by at least one sequence)."""
        return 1.0 - len(self._free) / self.num_pages

    @property
    def num_cached_pages(self) -> int:
        """Pages (in use or free) currently registered in the prefix cache."""
        return len(self._cached)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens over queried tokens since start (0 before any query)."""
        if not self.prefix_cache_queries:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries

    def ref_count(self, page: int) -> int:
        """How many sequences hold `page`."""
        return self._ref_counts[page]

    def is_cached(self, page: int) -> bool:
        """Whether `page` is registered in the prefix cache."""
        return self._page_hash[page] is not None

    def num_pages_needed(self, num_tokens: int) -> int:
        """Pages that hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    # ---- prefix lookup ----------------------------------------------------------------------
    def get_computed_pages(self, seq: Sequence) -> list[int]:
        """Cached pages matching `seq.token_ids` from the start, for a seq with no pages yet.

        Returns the longest chain of cached pages, capped so that at least one token remains to
        compute (its logits are needed). Reference counts are unchanged; pass the result to
        `allocate_slots`. Always empty when prefix caching is off. Counts towards the
        prefix-cache statistics (a seq that is looked up again, after failing to allocate, is
        counted again).
        """
        if seq.block_table:
            raise ValueError(f"get_computed_pages needs a seq without pages, got "
                             f"{len(seq.block_table)=} for {seq.request_id=}")
        if not self.enable_prefix_caching:
            return []
        ps = self.page_size
        max_pages = (seq.num_tokens - 1) // ps
        pages: list[int] = []
        parent = self._seed
        for i in range(max_pages):
            parent = self._hash(parent, tuple(seq.token_ids[i * ps:(i + 1) * ps]))
            page = self._cached.get(parent)
            if page is None:
                break
            pages.append(page)
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += len(pages) * ps
        return pages

    # ---- allocation -------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed_pages: SequenceABC[int] = ()) -> bool:
        """Give `seq` pages for `num_new_tokens` more tokens; all or nothing.

        With `computed_pages` (from `get_computed_pages`; `seq` must have no pages yet) those pages
        are taken first and `seq.num_computed_tokens` and `seq.num_cached_tokens` become
        `len(computed_pages) * page_size`. Then `seq.block_table` grows to cover
        `seq.num_computed_tokens + num_new_tokens` tokens with fresh pages from the head of the
        free queue (evicting their cached hashes). Returns False, changing nothing, when there
        are not enough free pages.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens=}")
        if computed_pages and seq.block_table:
            raise ValueError(f"computed_pages given for a seq that already holds pages: "
                             f"{seq.request_id=}, {len(seq.block_table)=}")
        fresh = not seq.block_table
        assert not fresh or seq.num_computed_tokens == 0, "a seq without pages has computed nothing"
        num_computed = len(computed_pages) * self.page_size if fresh else seq.num_computed_tokens
        num_have = len(seq.block_table) + len(computed_pages)
        num_needed = max(0, self.num_pages_needed(num_computed + num_new_tokens) - num_have)
        num_revived = sum(1 for p in computed_pages if self._ref_counts[p] == 0)
        if num_needed > len(self._free) - num_revived:
            return False

        for page in computed_pages:
            assert self._page_hash[page] is not None, f"computed page {page} is not cached"
            if self._ref_counts[page] == 0:
                del self._free[page]
            self._ref_counts[page] += 1
            seq.block_table.append(page)
        if computed_pages:
            self._seq_hashes[seq.seq_id] = [self._page_hash[p] for p in computed_pages]
        if fresh:
            seq.num_computed_tokens = num_computed
            seq.num_cached_tokens = num_computed
        for _ in range(num_needed):
            page, _ = self._free.popitem(last=False)
            self._evict(page)
            self._ref_counts[page] = 1
            seq.block_table.append(page)
        return True

    def _evict(self, page: int) -> None:
        h = self._page_hash[page]
        if h is not None:
            assert self._cached.get(h) == page
            del self._cached[h]
            self._page_hash[page] = None

    def cache_full_pages(self, seq: Sequence) -> None:
        """Register every full, computed page of `seq` not registered yet.

        Call after `seq.num_computed_tokens` advanced. A page whose hash is already registered to
        another page is left unregistered (the existing entry wins).
        """
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        num_full = min(seq.num_computed_tokens // ps, len(seq.block_table))
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        parent = hashes[-1] if hashes else self._seed
        for i in range(len(hashes), num_full):
            parent = self._hash(parent, tuple(seq.token_ids[i * ps:(i + 1) * ps]))
            hashes.append(parent)
            page = seq.block_table[i]
            if parent not in self._cached and self._page_hash[page] is None:
                self._cached[parent] = page
                self._page_hash[page] = parent

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share `parent`'s full computed prompt pages with `child` (an n>1 sibling, same prompt).

        `child` must hold no pages. It takes `min(full computed pages of parent,
        (child.num_prompt_tokens - 1) // page_size)` pages (refcount += 1) and its
        `num_computed_tokens` and `num_cached_tokens` are set to cover them. Works with prefix
        caching on or off. Follow with `allocate_slots(child, ...)` for the rest.
        """
        if child.block_table:
            raise ValueError(f"fork needs a child without pages, got {len(child.block_table)=}")
        if child.prompt_token_ids != parent.prompt_token_ids:
            raise ValueError(f"fork needs siblings with the same prompt: {parent.request_id=}, "
                             f"{child.request_id=}")
        ps = self.page_size
        num_full = min(parent.num_computed_tokens // ps, len(parent.block_table))
        k = min(num_full, (child.num_prompt_tokens - 1) // ps)
        shared = parent.block_table[:k]
        for page in shared:
            assert self._ref_counts[page] > 0
            self._ref_counts[page] += 1
        child.block_table = list(shared)
        child.num_computed_tokens = child.num_cached_tokens = k * ps
        parent_hashes = self._seq_hashes.get(parent.seq_id)
        if self.enable_prefix_caching and parent_hashes:
            self._seq_hashes[child.seq_id] = parent_hashes[:k]

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s pages, last page first, so that tail pages are evicted first."""
        for page in reversed(seq.block_table):
            assert self._ref_counts[page] > 0, f"page {page} freed more often than taken"
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                self._free[page] = None
        seq.block_table = []
        self._seq_hashes.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash, so no later lookup hits; for use after weights change.

        Refused (returns False, changes nothing) while any page is in use, since the pages of
        running sequences would be registered again from stale content. Returns True on success.
        """
        if len(self._free) != self.num_pages:
            logger.warning("reset_prefix_cache refused: %d pages are in use",
                           self.num_pages - len(self._free))
            return False
        self._cached.clear()
        self._page_hash = [None] * self.num_pages
        self._seq_hashes.clear()
        return True
