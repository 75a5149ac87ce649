"""The logical KV page allocator: refcounts, LRU free queue, prefix caching, fork. CPU, no jax."""

from __future__ import annotations

import random

import pytest

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.sequence import Sequence
from jaxserve.sampling_params import SamplingParams

PS = 4


def make_seq(tokens, request_id: str = "r") -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams())


def assert_no_leaks(bm: BlockManager) -> None:
    assert bm.num_free_pages == bm.num_pages
    assert all(bm.ref_count(p) == 0 for p in range(bm.num_pages))
    assert bm.usage == 0.0


def run_prefill(bm: BlockManager, seq: Sequence, computed_pages=()) -> None:
    """Allocate and 'compute' the whole of `seq`, then register its full pages."""
    n = len(computed_pages) * bm.page_size
    assert bm.allocate_slots(seq, seq.num_tokens - n, computed_pages)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_pages(seq)


def test_allocate_grows_and_free_returns_every_page():
    bm = BlockManager(num_pages=8, page_size=PS)
    seq = make_seq(range(5))
    assert bm.allocate_slots(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free_pages == 6
    assert [bm.ref_count(p) for p in seq.block_table] == [1, 1]
    seq.num_computed_tokens = 5
    assert bm.allocate_slots(seq, 3)  # 8 tokens still fit in 2 pages
    assert len(seq.block_table) == 2
    assert bm.allocate_slots(seq, 4)  # 9 tokens need a third page
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.usage == pytest.approx(3 / 8)
    bm.free(seq)
    assert seq.block_table == []
    assert_no_leaks(bm)


def test_allocate_is_atomic_when_pages_run_out():
    bm = BlockManager(num_pages=4, page_size=PS)
    a = make_seq(range(12))
    assert bm.allocate_slots(a, 12)
    b = make_seq(range(100, 108))
    b.num_computed_tokens = 0
    assert not bm.allocate_slots(b, 8)  # needs 2, 1 free
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert bm.num_free_pages == 1
    assert bm.allocate_slots(b, 4)


def test_allocate_is_atomic_counting_revived_cached_pages():
    bm = BlockManager(num_pages=4, page_size=PS)
    a = make_seq(range(8))
    run_prefill(bm, a)
    cached = list(a.block_table)
    bm.free(a)
    holder = make_seq(range(50, 53))
    assert bm.allocate_slots(holder, 3)
    assert bm.num_free_pages == 3  # the 2 cached pages and 1 empty one

    b = make_seq(list(range(8)) + [9, 9, 9, 9, 9])  # 13 tokens: 4 pages, 2 of them cached
    hit = bm.get_computed_pages(b)
    assert hit == cached
    # 2 fresh pages needed but only 1 free page is not one of the hits.
    assert not bm.allocate_slots(b, 5, hit)
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_cached_tokens == 0
    assert bm.num_free_pages == 3
    assert all(bm.ref_count(p) == 0 for p in cached)
    assert bm.get_computed_pages(make_seq(list(range(8)) + [1])) == cached  # still cached

    bm.free(holder)
    assert bm.allocate_slots(b, 5, hit)
    assert b.block_table[:2] == cached and b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    bm.free(b)
    assert_no_leaks(bm)


def test_prefix_hit_shares_pages_with_refcounts_and_stats():
    bm = BlockManager(num_pages=10, page_size=PS)
    a = make_seq(range(10))
    run_prefill(bm, a)
    assert bm.num_cached_pages == 2  # the third page holds 2 tokens: never registered

    b = make_seq(list(range(8)) + [77, 78, 79])
    queries, hits = bm.prefix_cache_queries, bm.prefix_cache_hits
    hit = bm.get_computed_pages(b)
    assert hit == a.block_table[:2]
    assert bm.prefix_cache_queries - queries == 11 and bm.prefix_cache_hits - hits == 8
    assert [bm.ref_count(p) for p in hit] == [1, 1]  # lookup alone takes nothing
    assert bm.allocate_slots(b, 3, hit)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert [bm.ref_count(p) for p in hit] == [2, 2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8

    bm.free(a)
    assert [bm.ref_count(p) for p in hit] == [1, 1]
    assert bm.num_free_pages == 10 - 3
    bm.free(b)
    assert_no_leaks(bm)


def test_prefix_hit_leaves_one_token_to_compute():
    bm = BlockManager(num_pages=10, page_size=PS)
    a = make_seq(range(8))
    run_prefill(bm, a)
    assert bm.num_cached_pages == 2
    same = make_seq(range(8))
    assert bm.get_computed_pages(same) == a.block_table[:1]
    longer = make_seq(range(9))
    assert bm.get_computed_pages(longer) == a.block_table[:2]


def test_only_full_computed_pages_are_registered():
    bm = BlockManager(num_pages=10, page_size=PS)
    a = make_seq(range(10))
    assert bm.allocate_slots(a, 10)
    a.num_computed_tokens = 3
    bm.cache_full_pages(a)
    assert bm.num_cached_pages == 0
    a.num_computed_tokens = 6
    bm.cache_full_pages(a)
    assert bm.num_cached_pages == 1 and bm.is_cached(a.block_table[0])
    a.num_computed_tokens = 10
    bm.cache_full_pages(a)
    assert bm.num_cached_pages == 2 and not bm.is_cached(a.block_table[2])


def test_hash_is_chained_over_the_whole_prefix():
    bm = BlockManager(num_pages=10, page_size=PS)
    run_prefill(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second page, different first page: no hit at all.
    assert bm.get_computed_pages(make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []


def test_duplicate_content_keeps_the_first_registration():
    bm = BlockManager(num_pages=10, page_size=PS)
    a, b = make_seq(range(9)), make_seq(range(9))
    run_prefill(bm, a)
    run_prefill(bm, b)  # computed without a lookup: same content in other pages
    assert bm.num_cached_pages == 2
    assert not any(bm.is_cached(p) for p in b.block_table)
    assert bm.get_computed_pages(make_seq(range(9))) == a.block_table[:2]
    bm.free(a)
    bm.free(b)
    assert_no_leaks(bm)


def test_lru_eviction_takes_the_oldest_freed_page_first():
    bm = BlockManager(num_pages=4, page_size=PS)
    a, b = make_seq(range(9)), make_seq(range(100, 109))
    assert bm.allocate_slots(a, 8) and bm.allocate_slots(b, 8)
    a.num_computed_tokens = b.num_computed_tokens = 8
    bm.cache_full_pages(a)
    bm.cache_full_pages(b)
    pages_a, pages_b = list(a.block_table), list(b.block_table)
    bm.free(a)  # tail page first: free queue is a1, a0
    bm.free(b)  # then b1, b0
    assert_no_leaks(bm)
    assert bm.num_cached_pages == 4  # free pages stay findable until reused

    c = make_seq([7, 7, 7])
    assert bm.allocate_slots(c, 3)
    assert c.block_table == [pages_a[1]]
    assert not bm.is_cached(pages_a[1]) and bm.num_cached_pages == 3
    assert bm.get_computed_pages(a) == pages_a[:1]  # a's second page was evicted
    c.num_computed_tokens = 3
    assert bm.allocate_slots(c, 3)
    assert c.block_table == [pages_a[1], pages_a[0]]
    assert bm.get_computed_pages(a) == []
    assert bm.get_computed_pages(b) == pages_b  # untouched
    bm.free(c)
    assert_no_leaks(bm)


def test_reused_page_is_evicted_even_when_taken_by_a_prefix_hit_owner():
    bm = BlockManager(num_pages=2, page_size=PS)
    a = make_seq(range(5))
    run_prefill(bm, a)
    bm.free(a)
    b = make_seq(range(50, 58))
    assert bm.allocate_slots(b, 8)  # takes both pages, evicting a's cached page
    assert bm.num_cached_pages == 0
    assert bm.get_computed_pages(make_seq(range(5))) == []


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_fork_shares_the_parent_prompt_pages(prefix_caching):
    bm = BlockManager(num_pages=10, page_size=PS, enable_prefix_caching=prefix_caching)
    parent = make_seq(range(10))
    run_prefill(bm, parent)
    parent.append_token(99)
    child = make_seq(range(10))
    bm.fork(parent, child)
    assert child.block_table == parent.block_table[:2]
    assert child.num_computed_tokens == 8
    assert [bm.ref_count(p) for p in parent.block_table] == [2, 2, 1]
    assert bm.allocate_slots(child, 2)
    assert len(child.block_table) == 3 and child.block_table[2] not in parent.block_table
    child.append_token(55)
    child.append_token(56)
    child.num_computed_tokens = 12
    assert bm.allocate_slots(child, 0)
    bm.cache_full_pages(child)  # the child's own third page chains on the shared prefix
    expected = child.block_table if prefix_caching else []
    assert bm.get_computed_pages(make_seq(child.token_ids + [1])) == expected
    bm.free(parent)
    assert [bm.ref_count(p) for p in child.block_table] == [1, 1, 1]
    bm.free(child)
    assert_no_leaks(bm)


def test_fork_is_capped_by_the_child_prompt_and_parent_progress():
    bm = BlockManager(num_pages=10, page_size=PS)
    parent = make_seq(range(8))
    run_prefill(bm, parent)
    child = make_seq(range(8))
    bm.fork(parent, child)  # at least one prompt token must stay to compute
    assert child.block_table == parent.block_table[:1] and child.num_computed_tokens == 4

    slow = make_seq(range(12))
    assert bm.allocate_slots(slow, 12)
    slow.num_computed_tokens = 5
    slow_child = make_seq(range(12))
    bm.fork(slow, slow_child)
    assert slow_child.block_table == slow.block_table[:1]
    with pytest.raises(ValueError):
        bm.fork(parent, make_seq(range(1, 9)))


def test_reset_prefix_cache_refuses_while_pages_are_in_use():
    bm = BlockManager(num_pages=4, page_size=PS)
    a = make_seq(range(9))
    run_prefill(bm, a)
    assert not bm.reset_prefix_cache()
    assert bm.num_cached_pages == 2
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.num_cached_pages == 0
    assert bm.get_computed_pages(make_seq(range(9))) == []
    again = make_seq(range(9))
    run_prefill(bm, again)  # the same content registers afresh
    assert bm.num_cached_pages == 2
    assert bm.get_computed_pages(make_seq(range(9))) == again.block_table[:2]


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor", "builtin"])
def test_every_hash_algo_finds_prefixes(algo):
    bm = BlockManager(num_pages=6, page_size=PS, hash_algo=algo)
    a = make_seq(range(13))
    run_prefill(bm, a)
    assert bm.get_computed_pages(make_seq(list(range(12)) + [5])) == a.block_table[:3]
    assert bm.get_computed_pages(make_seq(list(range(11)) + [0, 5])) == a.block_table[:2]


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError):
        BlockManager(num_pages=4, page_size=PS, hash_algo="md5")
    with pytest.raises(ValueError):
        BlockManager(num_pages=0, page_size=PS)
    bm = BlockManager(num_pages=4, page_size=PS)
    seq = make_seq(range(5))
    assert bm.allocate_slots(seq, 5)
    with pytest.raises(ValueError):
        bm.get_computed_pages(seq)
    with pytest.raises(ValueError):
        bm.allocate_slots(seq, -1)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_pages=6, page_size=PS, enable_prefix_caching=False)
    run_prefill(bm, make_seq(range(9)))
    assert bm.num_cached_pages == 0
    assert bm.get_computed_pages(make_seq(range(9))) == []


def test_random_workload_keeps_refcounts_consistent():
    rng = random.Random(0)
    bm = BlockManager(num_pages=16, page_size=PS)
    prefixes = [[rng.randrange(5) for _ in range(8)] for _ in range(3)]
    live: list[Sequence] = []
    for _ in range(300):
        if live and (rng.random() < 0.4 or bm.num_free_pages < 3):
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            tail = [rng.randrange(5) for _ in range(rng.randrange(1, 6))]
            seq = make_seq(rng.choice(prefixes) + tail)
            hit = bm.get_computed_pages(seq)
            if bm.allocate_slots(seq, seq.num_tokens - len(hit) * PS, hit):
                seq.num_computed_tokens = seq.num_tokens
                bm.cache_full_pages(seq)
                live.append(seq)
        expected = [0] * bm.num_pages
        for s in live:
            for p in s.block_table:
                expected[p] += 1
        assert [bm.ref_count(p) for p in range(bm.num_pages)] == expected
        assert bm.num_free_pages == expected.count(0)
    assert bm.prefix_cache_hits > 0
    for s in live:
        bm.free(s)
    assert_no_leaks(bm)
