"""Continuous batching: budgets, chunked prefill, preemption, n>1 forks. CPU, no jax.

`FakeEngine` drives schedule() -> run -> update_from_output() -> append/finish like the real engine,
and keeps a simulated KV cache: every step it checks that the pages a sequence reads hold exactly
that sequence's tokens, which catches wrong prefix hits, wrong forks and reuse of live pages.
"""

from __future__ import annotations

import random

import pytest

from jaxserve.config import SchedulerConfig
from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.scheduler import Scheduler, SchedulerOutput
from jaxserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from jaxserve.sampling_params import SamplingParams

PS = 4


def make_seq(prompt, max_tokens: int = 4, request_id: str | None = None, **kw) -> Sequence:
    seq = Sequence(request_id or "", list(prompt), SamplingParams(max_tokens=max_tokens), **kw)
    seq.request_id = request_id or f"req-{seq.seq_id}"
    return seq


def make_scheduler(num_pages: int = 64, prefix_caching: bool = True, **cfg) -> Scheduler:
    cfg.setdefault("max_model_len", 256)
    cfg.setdefault("max_num_seqs", 8)
    bm = BlockManager(num_pages=num_pages, page_size=PS, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(**cfg), bm)


def token_for(seq: Sequence, pos: int) -> int:
    return 1000 + (seq.seq_id * 31 + pos) % 97


class FakeEngine:
    """Runs steps against a simulated KV cache and checks every step's invariants."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.bm = sched.block_manager
        self.kv: dict[tuple[int, int], int] = {}  # (page, slot) -> token
        self.finished: list[Sequence] = []

    def step(self) -> SchedulerOutput:
        sched, cfg, ps = self.sched, self.sched.config, self.bm.page_size
        out = sched.schedule()
        assert out.total_tokens <= cfg.max_num_batched_tokens
        assert out.num_seqs <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
        assert len({s.seq_id for s in out.seqs}) == out.num_seqs
        for i, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens)):
            is_decode = n == 1 and seq.num_tokens - seq.num_computed_tokens == 1
            assert is_decode == (i < out.num_decodes), "decodes must come first"
            assert seq.status is SequenceStatus.RUNNING and n >= 1
            assert seq.num_computed_tokens + n <= min(seq.num_tokens, len(seq.block_table) * ps)
            for pos in range(seq.num_computed_tokens):  # what attention reads
                page = seq.block_table[pos // ps]
                assert self.kv.get((page, pos % ps)) == seq.token_ids[pos], (seq.seq_id, pos)
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                self.kv[(seq.block_table[pos // ps], pos % ps)] = seq.token_ids[pos]
        for seq in out.preempted:
            assert seq.status is SequenceStatus.WAITING and seq.block_table == []
            assert seq.num_computed_tokens == 0
        self.finished += out.ignored
        sched.update_from_output(out)
        for seq in out.seqs:
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(token_for(seq, seq.num_tokens))
                if seq.num_output_tokens >= seq.sampling_params.max_tokens:
                    sched.finish(seq, FinishReason.LENGTH)
                    self.finished.append(seq)
        return out

    def run(self, max_steps: int = 1000) -> int:
        for step in range(max_steps):
            if not self.sched.has_unfinished:
                return step
            self.step()
        raise AssertionError(f"not done after {max_steps} steps: {self.sched.num_waiting} waiting, "
                             f"{self.sched.num_running} running")


def assert_no_leaks(bm: BlockManager) -> None:
    assert bm.num_free_pages == bm.num_pages
    assert all(bm.ref_count(p) == 0 for p in range(bm.num_pages))


def assert_completed(seq: Sequence) -> None:
    expected = [token_for(seq, pos) for pos in range(seq.num_prompt_tokens, seq.num_tokens)]
    assert seq.output_token_ids == expected
    assert seq.num_output_tokens == seq.sampling_params.max_tokens
    assert seq.finish_reason is FinishReason.LENGTH and seq.block_table == []


def test_decodes_come_first_in_the_output():
    sched = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=8,
                           max_num_partial_prefills=2, max_long_partial_prefills=2)
    long, short = make_seq(range(30)), make_seq(range(100, 104))
    sched.add(long)
    sched.add(short)
    eng = FakeEngine(sched)
    out = eng.step()
    assert out.seqs == [long, short] and out.num_new_tokens == [8, 4] and out.num_decodes == 0
    out = eng.step()  # running order is long (prefilling), short (decoding)
    assert out.seqs == [short, long] and out.num_new_tokens == [1, 8] and out.num_decodes == 1


def test_token_budget_and_max_num_seqs_are_respected():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    seqs = [make_seq(range(i, i + 5), max_tokens=6) for i in range(10)]
    for seq in seqs:
        sched.add(seq)
    eng = FakeEngine(sched)
    out = eng.step()
    assert out.num_new_tokens == [5, 5, 5, 1]  # the budget cuts the fourth prompt
    assert sched.num_running == 4 and sched.num_waiting == 6
    out = eng.step()
    assert out.num_seqs == 4 and out.num_decodes == 3  # the 4th still prefills; no 5th slot
    eng.run()
    for seq in seqs:
        assert_completed(seq)
    assert_no_leaks(sched.block_manager)


@pytest.mark.parametrize(("threshold", "chunks"), [(0, [16, 16, 8, 1]), (8, [8, 8, 8, 8, 8, 1])])
def test_chunked_prefill_splits_a_long_prompt_and_finishes_it(threshold, chunks):
    sched = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=threshold)
    seq = make_seq(range(40), max_tokens=3)
    sched.add(seq)
    eng = FakeEngine(sched)
    assert [eng.step().num_new_tokens for _ in chunks] == [[n] for n in chunks]
    assert seq.num_computed_tokens == 41 and seq.num_output_tokens == 2  # then decodes
    eng.run()
    assert_completed(seq)
    assert_no_leaks(sched.block_manager)


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    sched = make_scheduler(max_num_batched_tokens=32, max_model_len=32,
                           enable_chunked_prefill=False)
    a, b, c = make_seq(range(20)), make_seq(range(50, 70)), make_seq(range(90, 95))
    for seq in (a, b, c):
        sched.add(seq)
    eng = FakeEngine(sched)
    out = eng.step()
    assert out.seqs == [a] and out.num_new_tokens == [20]  # b does not fit; c waits behind it
    assert list(sched.waiting) == [b, c]
    out = eng.step()
    assert out.seqs == [a, b, c] and out.num_new_tokens == [1, 20, 5]
    eng.run()
    assert_no_leaks(sched.block_manager)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_victim_follows_the_policy(policy):
    # 6 pages: three 7-token prompts fill them; low's second decode then needs a third page.
    sched = make_scheduler(num_pages=6, max_num_batched_tokens=64, policy=policy)
    low = make_seq(range(7), priority=5, arrival_time=0.0)
    sched.add(low)
    eng = FakeEngine(sched)
    eng.step()
    high = make_seq(range(20, 27), priority=0, arrival_time=1.0)
    mid = make_seq(range(40, 47), priority=1, arrival_time=2.0)
    sched.add(high)
    sched.add(mid)
    eng.step()
    assert sched.running == [low, high, mid] and sched.block_manager.num_free_pages == 0
    out = eng.step()
    # fcfs: the latest admitted (mid) goes; priority: the lowest priority (low) preempts itself.
    victim = mid if policy == "fcfs" else low
    assert out.preempted == [victim]
    assert victim.num_preemptions == 1 and victim.status is SequenceStatus.WAITING
    assert list(sched.waiting) == [victim] and victim not in out.seqs
    assert sorted(s.seq_id for s in out.seqs) == sorted(s.seq_id for s in (low, high, mid)
                                                       if s is not victim)
    eng.run()
    for seq in (low, high, mid):
        assert_completed(seq)
    assert_no_leaks(sched.block_manager)


def test_preempted_seq_returns_to_the_front_and_blocks_admission_that_step():
    sched = make_scheduler(num_pages=7, max_num_batched_tokens=64)
    a, b, c = (make_seq(range(k, k + 8)) for k in (0, 20, 40))
    for seq in (a, b, c):
        sched.add(seq)
    eng = FakeEngine(sched)
    eng.step()
    late = make_seq([5])
    sched.add(late)  # one page would hold it, and one page is free after the preemption
    out = eng.step()
    assert out.preempted == [c]
    assert list(sched.waiting) == [c, late] and sched.block_manager.num_free_pages == 1


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_tiny_pool_many_requests_all_complete(policy, chunked, prefix_caching):
    rng = random.Random(f"{policy}{chunked}{prefix_caching}")
    sched = make_scheduler(num_pages=6, prefix_caching=prefix_caching, policy=policy,
                           enable_chunked_prefill=chunked, max_num_batched_tokens=24,
                           max_model_len=24, max_num_seqs=4)
    shared = [rng.randrange(50) for _ in range(8)]
    seqs = []
    for i in range(20):
        tail = [rng.randrange(50) for _ in range(rng.randrange(2, 9))]
        prompt = (shared if i % 3 == 0 else []) + tail
        seqs.append(make_seq(prompt, max_tokens=rng.randrange(1, 24 - len(prompt) + 1),
                             priority=rng.randrange(3), arrival_time=float(i)))
        sched.add(seqs[-1])
    eng = FakeEngine(sched)
    eng.run(max_steps=2000)
    assert sched.total_preemptions > 0
    assert sorted(s.seq_id for s in eng.finished) == sorted(s.seq_id for s in seqs)
    for seq in seqs:
        assert_completed(seq)
    assert_no_leaks(sched.block_manager)


def test_abort_frees_pages_of_running_and_waiting_requests():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=2)
    a, b, c = make_seq(range(10)), make_seq(range(20, 30)), make_seq(range(40, 50))
    for seq in (a, b, c):
        sched.add(seq)
    eng = FakeEngine(sched)
    eng.step()
    bm = sched.block_manager
    assert bm.num_free_pages < bm.num_pages and c.status is SequenceStatus.WAITING
    for seq in (a, c):
        assert sched.abort(seq.request_id) == [seq]
        assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.ABORT
        assert seq.block_table == []
    assert sched.abort("no-such-request") == []
    assert sched.running == [b] and sched.num_waiting == 0
    assert bm.num_free_pages == bm.num_pages - len(b.block_table)
    eng.run()
    assert_no_leaks(bm)


def test_abort_between_schedule_and_update_is_harmless():
    sched = make_scheduler()
    seq = make_seq(range(10))
    sched.add(seq)
    out = sched.schedule()
    sched.abort(seq.request_id)
    sched.update_from_output(out)
    assert seq.num_computed_tokens == 0 and not sched.has_unfinished
    assert_no_leaks(sched.block_manager)


@pytest.mark.parametrize("max_partial", [1, 2])
def test_partial_prefill_limits_make_extra_partials_wait(max_partial):
    sched = make_scheduler(max_num_batched_tokens=20, max_num_seqs=3,
                           long_prefill_token_threshold=8, max_num_partial_prefills=max_partial,
                           max_long_partial_prefills=1)
    prompts = [range(40), range(50, 90), range(100, 106), range(110, 117), range(120, 123),
               range(130, 140)]
    a, b, c, d, e, f = seqs = [make_seq(p) for p in prompts]
    for seq in seqs:
        sched.add(seq)
    eng = FakeEngine(sched)
    out = eng.step()
    # a: the one long partial; b would be a 2nd long partial, waits; c fits whole; d is short but
    # the budget caps it: a 2nd partial, allowed only with max_partial=2; max_num_seqs=3 stops f.
    if max_partial == 1:
        assert out.seqs == [a, c, e] and out.num_new_tokens == [8, 6, 3]
        assert list(sched.waiting) == [b, d, f]  # skipped seqs keep their place in the queue
    else:
        assert out.seqs == [a, c, d] and out.num_new_tokens == [8, 6, 6]
        assert list(sched.waiting) == [b, e, f]
    eng.run()
    for seq in seqs:
        assert_completed(seq)
    assert_no_leaks(sched.block_manager)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_siblings_fork_the_parent_prompt_pages(prefix_caching):
    sched = make_scheduler(prefix_caching=prefix_caching)
    bm = sched.block_manager
    parent = make_seq(range(10), max_tokens=5, request_id="req")
    child = make_seq(range(10), max_tokens=5, request_id="req", parent=parent, index=1)
    other = make_seq(range(30, 36), max_tokens=5)
    for seq in (parent, child, other):
        sched.add(seq)
    eng = FakeEngine(sched)
    out = eng.step()
    assert out.seqs == [parent, other]  # the child waits for its parent's prefill
    assert list(sched.waiting) == [child]
    out = eng.step()
    assert child in out.seqs and out.num_new_tokens[out.seqs.index(child)] == 2
    assert child.block_table[:2] == parent.block_table[:2]
    assert [bm.ref_count(p) for p in parent.block_table[:2]] == [2, 2]
    assert child.num_cached_tokens == 8  # only the last 2 prompt tokens were computed
    eng.run()
    assert_completed(parent)
    assert_completed(child)
    assert_no_leaks(bm)


def test_sibling_fork_is_undone_when_its_pages_do_not_fit():
    sched = make_scheduler(num_pages=3)
    bm = sched.block_manager
    parent = make_seq(range(10), max_tokens=2, request_id="req")
    child = make_seq(range(10), max_tokens=2, request_id="req", parent=parent, index=1)
    sched.add(parent)
    sched.add(child)
    eng = FakeEngine(sched)
    eng.step()
    out = eng.step()  # the fork shares 2 pages, but the child's third page does not fit
    assert out.seqs == [parent] and list(sched.waiting) == [child]
    assert child.block_table == [] and child.num_computed_tokens == 0
    assert parent.is_finished and bm.num_free_pages == 3
    eng.run()
    assert_completed(child)
    assert_no_leaks(bm)


def test_prefix_cache_hit_skips_cached_tokens():
    sched = make_scheduler()
    first = make_seq(range(12), max_tokens=2)
    sched.add(first)
    eng = FakeEngine(sched)
    eng.run()
    again = make_seq(range(12), max_tokens=2)
    sched.add(again)
    out = eng.step()
    assert out.num_new_tokens == [4] and again.num_cached_tokens == 8
    eng.run()
    assert_completed(again)
    assert_no_leaks(sched.block_manager)


def test_prompt_larger_than_the_pool_is_finished_not_hung():
    sched = make_scheduler(num_pages=2)
    huge, small = make_seq(range(12)), make_seq(range(3))
    sched.add(huge)
    sched.add(small)
    out = FakeEngine(sched).step()
    assert out.ignored == [huge] and out.seqs == [small]
    assert huge.status is SequenceStatus.FINISHED and huge.finish_reason is FinishReason.LENGTH


def test_seq_outgrowing_the_pool_during_decode_terminates():
    sched = make_scheduler(num_pages=3)
    seq = make_seq(range(8), max_tokens=20)
    sched.add(seq)
    eng = FakeEngine(sched)
    eng.run(max_steps=50)
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 13
    assert seq.num_preemptions == 1 and seq in eng.finished
    assert_no_leaks(sched.block_manager)


def test_add_rejects_finished_or_empty_sequences():
    sched = make_scheduler()
    with pytest.raises(ValueError):
        sched.add(make_seq([]))
    done = make_seq([1])
    done.status = SequenceStatus.FINISHED
    with pytest.raises(ValueError):
        sched.add(done)
