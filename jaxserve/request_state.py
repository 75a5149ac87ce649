"""Per-request bookkeeping on the host: generated text, logprobs, stop checks, output deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxserve.detokenizer import OutputText
from jaxserve.engine.sampler import SamplerOutput
from jaxserve.engine.sequence import FinishReason, Sequence
from jaxserve.outputs import (CompletionOutput, Logprob, PromptLogprobs, RequestMetrics,
                              RequestOutput, SampleLogprobs)
from jaxserve.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class _Completion:
    seq: Sequence
    text: OutputText
    logprobs: SampleLogprobs | None
    cumulative_logprob: float = 0.0
    # What earlier DELTA outputs already carried.
    sent_tokens: int = 0
    sent_logprobs: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    sent_final: bool = False
    last_token_time: float | None = None


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    completions: list[_Completion] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    def add_sequence(self, seq: Sequence, text: OutputText) -> None:
        logprobs = [] if self.params.logprobs is not None else None
        self.completions.append(_Completion(seq, text, logprobs))

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    def record_prompt_logprobs(self, tokenizer, start: int, n: int, offset: int, prompt) -> None:
        """Logprobs of prompt tokens start+1 .. start+n predicted by this chunk's positions."""
        if self.prompt_logprobs is None:
            return
        k = self.params.prompt_logprobs
        last = min(start + n, len(self.prompt_token_ids) - 1)
        for pos in range(start, last):
            target = pos + 1
            if target < len(self.prompt_logprobs):
                continue  # recomputed after a preemption: already recorded
            row = offset + pos - start
            self.prompt_logprobs.append(_logprob_dict(
                tokenizer, self.prompt_token_ids[target], prompt.logprob[row], prompt.rank[row],
                prompt.top_ids[row], prompt.top_logprobs[row], k))

    def append_token(self, seq: Sequence, row: int, sampled: SamplerOutput, tokenizer,
                     eos_ids: tuple[int, ...], max_model_len: int,
                     now: float) -> FinishReason | None:
        """Append the sampled token to `seq`; return why it finished, if it did."""
        c = self.completions[seq.index]
        token = int(sampled.token_ids[row])
        seq.append_token(token)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
            self.metrics.num_cached_tokens = seq.num_cached_tokens
        lp = float(sampled.logprob[row])
        c.cumulative_logprob += lp
        if c.logprobs is not None:
            c.logprobs.append(_logprob_dict(tokenizer, token, lp, sampled.rank[row],
                                            sampled.top_ids[row], sampled.top_logprobs[row],
                                            self.params.logprobs))
        p = self.params
        enough = seq.num_output_tokens >= p.min_tokens
        eos_stop = enough and not p.ignore_eos and token in eos_ids
        id_stop = enough and token in p.stop_token_ids
        stop_str = c.text.append(token, stop_terminated=eos_stop or id_stop)
        reason, stop_reason = None, None
        if eos_stop:
            reason = FinishReason.STOP
        elif id_stop:
            reason, stop_reason = FinishReason.STOP, token
        elif stop_str is not None:
            reason, stop_reason = FinishReason.STOP, stop_str
        if reason is None and ((p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)
                               or seq.num_tokens >= max_model_len):
            reason = FinishReason.LENGTH
        if reason is not None:
            c.finish_reason, c.stop_reason = reason, stop_reason
        return reason

    def make_output(self) -> RequestOutput | None:
        """The output to emit now, per the request's output kind (None: nothing to emit)."""
        kind = self.params.output_kind
        finished = self.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        outs = []
        for i, c in enumerate(self.completions):
            ids = c.seq.output_token_ids
            if kind == RequestOutputKind.DELTA:
                done = c.finish_reason is not None
                text = c.text.take_delta(done)
                new_ids = ids[c.sent_tokens:]
                logprobs = c.logprobs[c.sent_logprobs:] if c.logprobs is not None else None
                c.sent_tokens, c.sent_logprobs = len(ids), len(c.logprobs or [])
                if not new_ids and not text and not (done and not c.sent_final):
                    continue
                if done:
                    c.sent_final = True
            else:
                text, new_ids, logprobs = c.text.text, list(ids), c.logprobs
            outs.append(CompletionOutput(
                index=i, text=text, token_ids=list(new_ids),
                cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None,
                logprobs=logprobs,
                finish_reason=c.finish_reason.value if c.finish_reason else None,
                stop_reason=c.stop_reason))
        if not outs and not finished:
            return None
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, finished,
                             prompt_logprobs=self.prompt_logprobs,
                             num_cached_tokens=self.metrics.num_cached_tokens,
                             metrics=self.metrics)


def _logprob_dict(tokenizer, token: int, logprob: float, rank, top_ids: np.ndarray,
                  top_lps: np.ndarray, k: int) -> dict[int, Logprob]:
    """vLLM's per-token dict: the chosen token first, then the top-k (which may include it)."""
    d = {token: Logprob(float(logprob), int(rank), tokenizer.decode([token]))}
    for j in range(k):
        tid = int(top_ids[j])
        if tid not in d:
            d[tid] = Logprob(float(top_lps[j]), j + 1, tokenizer.decode([tid]))
    return d
