"""Engine parity: greedy tokens through the engine equal `transformers` greedy, alone, in a busy
batch, across prefill chunks, under preemption and with prefix-cache hits."""

from __future__ import annotations

import pytest

from jaxserve import SamplingParams
from tiny_models import ARCHITECTURES, hf_greedy, random_prompts

NEW_TOKENS = 12


def _greedy(llm, prompts, n=NEW_TOKENS):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers(tiny_llm, arch):
    llm, hf = tiny_llm(arch)
    prompts = random_prompts(1, [3, 11, 20, 7])
    got = _greedy(llm, prompts)
    want = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    assert got == want


def test_same_tokens_alone_in_busy_batch_chunked_and_preempted(tiny_llm):
    prompts = random_prompts(2, [5, 40, 9, 33] + [4 + (i * 7) % 30 for i in range(28)])
    target = prompts[1]
    llm, hf = tiny_llm("LlamaForCausalLM")
    want = hf_greedy(hf, target, NEW_TOKENS)
    assert _greedy(llm, [target]) == [want]  # alone
    # A busy batch of 32 (the engine holds 8 at a time, the rest queue).
    busy = _greedy(llm, prompts)
    assert busy[1] == want
    # Split into several prefill chunks: at most 16 tokens a step.
    chunked, _ = tiny_llm("LlamaForCausalLM", max_num_batched_tokens=16)
    assert _greedy(chunked, [target]) == [want]
    assert _greedy(chunked, prompts)[1] == want
    # A KV pool too small for everyone at once forces preemption by recompute.
    small, _ = tiny_llm("LlamaForCausalLM", num_gpu_blocks_override=28)
    got = _greedy(small, prompts)
    assert small.engine.scheduler.total_preemptions > 0
    assert got[1] == want
    assert got == busy
    assert small.engine.block_manager.num_free_pages == 28


def test_prefix_cache_hits_give_same_tokens(tiny_llm):
    llm, hf = tiny_llm("Qwen2ForCausalLM")
    shared = random_prompts(3, [24])[0]
    a, b = shared + [5, 6, 7], shared + [9, 10]
    first = llm.generate({"prompt_token_ids": a},
                         SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                         use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": b},
                          SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                          use_tqdm=False)[0]
    assert second.num_cached_tokens >= 20  # five full pages of the shared 24 tokens
    assert first.outputs[0].token_ids == hf_greedy(hf, a, NEW_TOKENS)
    assert second.outputs[0].token_ids == hf_greedy(hf, b, NEW_TOKENS)
