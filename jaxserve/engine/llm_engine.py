"""The engine loop: add requests, then `step()` = schedule, run, postprocess."""

from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import Future

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.detokenizer import OutputText
from jaxserve.engine import distributed, memory_plan
from jaxserve.engine.args import EngineArgs
from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.model_runner import ModelRunner, StepResult
from jaxserve.engine.replica import (Replica, copy_model, pick_replica,
                                     replica_placements, replica_runner_settings)
from jaxserve.engine.scheduler import Scheduler, SchedulerOutput
from jaxserve.engine.sequence import FinishReason, Sequence
from jaxserve.engine.stats import StatLogger
from jaxserve.metrics import Metrics
from jaxserve.models.loader import load_model
from jaxserve.models.source import load_chat_template, resolve_model
from jaxserve.outputs import RequestMetrics, RequestOutput
from jaxserve.request_state import RequestState
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def enable_compilation_cache(cache_dir: str | None) -> str:
    """Turn on JAX's persistent compilation cache (default `~/.cache/jaxserve/xla`)."""
    cache_dir = cache_dir or os.environ.get("JAXSERVE_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxserve", "xla")
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


class LLMEngine:
    """Loads the model, owns scheduler and runner, and turns steps into `RequestOutput`s.

    With data parallelism (`--data-parallel-size N`) it owns N replicas (engine/replica.py),
    each with its own runner, block manager and scheduler on its own devices; a request runs
    wholly on one of them, and `step()` steps them all at once.
    """

    def __init__(self, args: EngineArgs):
        start = time.perf_counter()
        self.args = args
        memory_plan.reserve_gpu_memory(args.gpu_memory_utilization)
        distributed.initialize(args)  # multi-host: join the other nodes before using devices
        cache_dir = enable_compilation_cache(args.compilation_cache_dir)
        source = resolve_model(args.model, download_dir=args.download_dir, revision=args.revision,
                               tokenizer=args.tokenizer)
        self.model_name = args.served_model_name or source.name
        self.model_path = source.path
        if args.hf_overrides:
            source.hf_config.update(args.hf_overrides)
            logger.info("config.json overridden with %s", args.hf_overrides)
        cfg = ModelConfig.from_hf(source.hf_config)
        max_model_len = args.resolve_max_model_len(cfg)
        self.tokenizer = source.load_tokenizer(args.tokenizer,
                                               trust_remote_code=args.trust_remote_code,
                                               revision=args.revision)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.model_config = cfg = cfg.replace(eos_token_ids=tuple(sorted(eos)))
        self.chat_template = load_chat_template(args.chat_template) or source.chat_template()
        self.dtype = args.resolve_dtype(cfg)
        self.scheduler_config = args.scheduler_config(max_model_len)
        kv_dtype = args.resolve_kv_cache_dtype(self.dtype)
        self.attention_backend = args.resolve_attention_backend(self.dtype, kv_dtype)
        self.cache_config = args.cache_config(self.attention_backend)
        logger.info("dtype %s, KV cache %s, attention backend %s", jnp.dtype(self.dtype).name,
                    jnp.dtype(kv_dtype).name, self.attention_backend)
        placements = replica_placements(cfg, args.parallel_config())
        self.placement = placements[0]  # replica 0's; every replica's is alike on its own devices
        # the config of the model as built on the devices
        model_cfg = self.placement.model_config(cfg) if self.placement else cfg
        self.replicas = self._build_replicas(source, model_cfg, placements, kv_dtype, cache_dir)
        # Replica 0 (the only one without data parallelism), for callers that want one.
        self.runner = self.replicas[0].runner
        self.block_manager = self.replicas[0].block_manager
        self.scheduler = self.replicas[0].scheduler
        self._replica_of: dict[str, Replica] = {}  # request id -> the replica serving it
        self.requests: dict[str, RequestState] = {}
        self._rng = random.Random(args.seed)
        self.stats = StatLogger(enabled=not args.disable_log_stats)
        self.default_sampling_params = _default_sampling_params(args, source)
        self._grammar_backend = None  # built on the first structured-output request
        if (args.structured_outputs_config or {}).get("reasoning_parser"):
            logger.warning("structured outputs constrain a response from its first token: with "
                           "reasoning parser %r a constrained request cannot reason first (vLLM "
                           "waits for the reasoning to end; jaxserve does not yet)",
                           args.structured_outputs_config["reasoning_parser"])
        self._compiling: list[Sequence] = []  # sequences whose grammar is being compiled
        # Set by the server: Prometheus metrics recorded from the engine thread.
        self.metrics: Metrics | None = None
        logger.info("engine ready in %.1f s (compilation cache: %s)",
                    time.perf_counter() - start, cache_dir)

    def _build_replicas(self, source, model_cfg: ModelConfig, placements: list, kv_dtype,
                        cache_dir: str) -> list[Replica]:
        """A runner (weights, KV cache, compiled step), block manager and scheduler per
        placement. The checkpoint is read once, into replica 0; the others copy its arrays."""
        args = self.args
        runners = []
        for placement in placements:
            cache_key, cache_config = replica_runner_settings(
                placement, placements, self.attention_backend, self.cache_config,
                runners[0] if runners else None)
            runner = ModelRunner(model_cfg, cache_config, self.scheduler_config, self.dtype,
                                 enforce_eager=args.enforce_eager, kv_cache_dtype=kv_dtype,
                                 compile_sizes=args.compile_sizes,
                                 executable_cache_dir=os.path.join(cache_dir, "executables"),
                                 cache_key=cache_key, placement=placement,
                                 attention_backend=self.attention_backend)
            runner.prefetch_executables()  # while the weights load
            runners.append(runner)
        model = load_model(source, model_cfg, self.dtype, args.load_format, args.seed,
                           attention_backend=self.attention_backend, placement=placements[0])
        replicas = []
        for i, (runner, placement) in enumerate(zip(runners, placements)):
            runner.attach(model if i == 0 else copy_model(model, placement))
            runner.compile_all()
            block_manager = BlockManager(runner.num_pages, self.cache_config.block_size,
                                         self.cache_config.enable_prefix_caching,
                                         self.cache_config.prefix_caching_hash_algo)
            replicas.append(Replica(i, runner, block_manager,
                                    Scheduler(self.scheduler_config, block_manager)))
        return replicas

    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    # ---- totals over the replicas ------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return sum(r.scheduler.num_running for r in self.replicas)

    @property
    def num_waiting(self) -> int:
        return sum(r.scheduler.num_waiting for r in self.replicas)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of all replicas' KV pages in use."""
        bms = [r.block_manager for r in self.replicas]
        return 1.0 - sum(bm.num_free_pages for bm in bms) / sum(bm.num_pages for bm in bms)

    @property
    def prefix_cache_hit_rate(self) -> float:
        queries = sum(r.block_manager.prefix_cache_queries for r in self.replicas)
        hits = sum(r.block_manager.prefix_cache_hits for r in self.replicas)
        return hits / queries if queries else 0.0

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    *, prompt: str | None = None, arrival_time: float | None = None,
                    priority: int = 0) -> None:
        """Queue a request on the least loaded replica; raises ValueError for a prompt or
        params the engine cannot serve."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        if self.scheduler_config.policy == "fcfs" and priority != 0:
            raise ValueError("priority is only allowed with --scheduling-policy priority")
        arrival_time = time.time() if arrival_time is None else arrival_time
        state = RequestState(request_id, prompt, list(prompt_token_ids), params,
                             RequestMetrics(arrival_time))
        replica = pick_replica(self.replicas)  # all n sequences share it (they fork pages)
        parent = None
        for i in range(params.n):
            if params.seed is not None:
                seed = (params.seed * 1_000_003 + i) & 0xFFFFFFFF
            else:
                seed = self._rng.getrandbits(32)
            seq = Sequence(request_id, list(prompt_token_ids), params, arrival_time=arrival_time,
                           priority=priority, parent=parent, index=i, rng_seed=seed)
            parent = parent or seq
            state.add_sequence(seq, OutputText(self.tokenizer, seq.prompt_token_ids, params))
            if params.structured_outputs is not None:
                seq.grammar = self.compile_grammar(params)
                self._compiling.append(seq)
            replica.scheduler.add(seq)
        self.requests[request_id] = state
        self._replica_of[request_id] = replica

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt ({n} tokens) leaves no room to generate within "
                             f"max_model_len {self.max_model_len}")
        pages_needed = -(-(n + 1) // self.cache_config.block_size)
        if pages_needed > self.runner.num_pages:  # every replica has as many pages
            raise ValueError(f"the prompt ({n} tokens) needs {pages_needed} KV pages, more than "
                             f"the {self.runner.num_pages} the cache holds")
        params.verify_vocab(vocab)
        if params.structured_outputs is not None:
            grammar = self.compile_grammar(params)  # raises for an invalid spec
            if grammar.done() and grammar.exception() is not None:
                raise grammar.exception()
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.args.max_logprobs:
                raise ValueError(f"{name}={k} is above the server's --max-logprobs "
                                 f"{self.args.max_logprobs}")

    # ---- structured outputs ----------------------------------------------------------------
    def compile_grammar(self, params: SamplingParams) -> Future:
        """The compiled grammar of `params.structured_outputs` (a Future: compiled on the
        backend's threads, cached by spec). Raises `ValueError` for an invalid spec; a grammar
        the library rejects resolves the Future with `ValueError`."""
        spec = params.structured_outputs.spec()
        cfg = self.args.structured_outputs_config or {}
        if cfg.get("disable_additional_properties") and spec.kind == "json":
            from jaxserve.structured_output.spec import StructuredOutputSpec, close_objects

            spec = StructuredOutputSpec.from_fields(json=close_objects(spec.schema))
        if self._grammar_backend is None:
            from jaxserve.structured_output import GrammarBackend

            self._grammar_backend = GrammarBackend(
                self.tokenizer, self.model_config.vocab_size,
                eos_token_ids=self.model_config.eos_token_ids,
                any_whitespace=not cfg.get("disable_any_whitespace", False))
        return self._grammar_backend.compile(spec)

    def _start_matchers(self) -> list[Sequence]:
        """Give each sequence whose grammar has compiled its matcher (the scheduler admits it
        from then on); returns the sequences whose grammar failed, finished with ABORT."""
        failed, waiting = [], []
        for seq in self._compiling:
            if seq.is_finished:
                continue
            if not seq.grammar.done():
                waiting.append(seq)
                continue
            try:
                seq.matcher = seq.grammar.result().matcher()
            except ValueError as e:
                logger.error("request %s: its grammar failed to compile: %s", seq.request_id, e)
                self._replica_of[seq.request_id].scheduler.finish(seq, FinishReason.ABORT)
                failed.append(seq)
            seq.grammar = None
        self._compiling = waiting
        return failed

    def abort_request(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self._replica_of.pop(request_id).scheduler.abort(request_id)
            if self.metrics is not None:
                self._record_finished(state, "abort", time.time())

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule every replica, launch the non-empty steps (they run concurrently on their
        own devices), then collect and postprocess each."""
        failed = self._start_matchers() if self._compiling else []
        outs = [r.scheduler.schedule() for r in self.replicas]
        for seq in failed:
            outs[self._replica_of[seq.request_id].index].ignored.append(seq)
        if self.metrics is not None:
            now = time.time()
            for seq in (seq for out in outs for seq in out.seqs):
                state = self.requests.get(seq.request_id)
                if state is not None and state.metrics.first_scheduled_time is None:
                    state.metrics.first_scheduled_time = now
        pending = [None if out.is_empty else r.runner.launch(out)
                   for r, out in zip(self.replicas, outs)]
        outputs, prompt_tokens, num_sampled = [], 0, 0
        for r, out, launched in zip(self.replicas, outs, pending):
            result = None
            if launched is not None:
                result = r.runner.finish(launched)
                r.scheduler.update_from_output(out)
                prompt_tokens += out.total_tokens - out.num_decodes
            got, sampled = self._postprocess(out, result, r.scheduler)
            outputs += got
            num_sampled += sampled
        if all(launched is None for launched in pending):
            return outputs
        self.stats.record(prompt_tokens, num_sampled, running=self.num_running,
                          waiting=self.num_waiting, kv_usage=self.kv_cache_usage,
                          prefix_hit_rate=self.prefix_cache_hit_rate)
        self.record_metrics(prompt_tokens, num_sampled)
        return outputs

    def record_metrics(self, prompt_tokens: int = 0, generation_tokens: int = 0) -> None:
        """Update the Prometheus metrics (if any): after a step, or after aborts when idle."""
        if self.metrics is None:
            return
        self.metrics.record_step(
            prompt_tokens=prompt_tokens, generation_tokens=generation_tokens,
            running=self.num_running, waiting=self.num_waiting, kv_usage=self.kv_cache_usage,
            prefix_queries=sum(r.block_manager.prefix_cache_queries for r in self.replicas),
            prefix_hits=sum(r.block_manager.prefix_cache_hits for r in self.replicas),
            preemptions=sum(r.scheduler.total_preemptions for r in self.replicas))

    def _postprocess(self, out: SchedulerOutput, result: StepResult | None,
                     scheduler: Scheduler) -> tuple[list[RequestOutput], int]:
        """Append sampled tokens and build outputs (`scheduler`: the replica's that scheduled
        `out`); also returns how many tokens were sampled."""
        now = time.time()
        num_sampled = 0
        touched: dict[str, RequestState] = {}
        # Finished before running: they can never fit the pool (LENGTH), or their grammar
        # failed to compile (ABORT).
        for seq in out.ignored:
            state = self.requests.get(seq.request_id)
            if state is not None:
                state.completions[seq.index].finish_reason = seq.finish_reason
                touched[seq.request_id] = state
        offset = 0
        for row, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens)):
            state = self.requests.get(seq.request_id)
            start = seq.num_computed_tokens - n
            if state is not None and result.prompt is not None and seq.index == 0:
                state.record_prompt_logprobs(self.tokenizer, start, n, offset, result.prompt)
            offset += n
            if state is None or seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk that did not reach the last prompt token
            num_sampled += 1
            reason = state.append_token(seq, row, result.sampled, self.tokenizer,
                                        self.model_config.eos_token_ids, self.max_model_len, now)
            if seq.matcher is not None and not seq.matcher.accept_token(seq.last_token_id):
                # NOTE: cannot happen while the mask is applied; never continue unconstrained.
                logger.error("request %s: token %d is outside its grammar; stopping it",
                             seq.request_id, seq.last_token_id)
                if reason is None:
                    reason = state.completions[seq.index].finish_reason = FinishReason.ABORT
            c = state.completions[seq.index]
            if self.metrics is not None and (c.last_token_time is not None or seq.index == 0):
                self.metrics.record_token(state.metrics.arrival_time, c.last_token_time, now)
            c.last_token_time = now
            if reason is not None:
                scheduler.finish(seq, reason)
            touched[seq.request_id] = state
        outputs = []
        for request_id, state in touched.items():
            output = state.make_output()
            if output is not None:
                outputs.append(output)
            if state.finished:
                state.metrics.finished_time = now
                del self.requests[request_id]
                del self._replica_of[request_id]
                if self.metrics is not None:
                    self._record_finished(state, state.completions[0].finish_reason.value, now)
        return outputs, num_sampled

    def _record_finished(self, state: RequestState, reason: str, now: float) -> None:
        self.metrics.record_finished(reason, state.metrics, now, len(state.prompt_token_ids),
                                     sum(c.seq.num_output_tokens for c in state.completions),
                                     state.params.max_tokens, state.params.n)

    def abort_all(self) -> None:
        for request_id in list(self.requests):
            self.abort_request(request_id)


# The generation_config.json keys that become default sampling parameters (as in vLLM).
_GENERATION_KEYS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature",
                    "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                    "max_new_tokens": "max_tokens"}


def _default_sampling_params(args: EngineArgs, source) -> dict:
    """Sampling defaults for requests that leave a field unset: the model's generation config
    (`--generation-config auto` or a folder), then `--override-generation-config` on top."""
    found: dict = {}
    if args.generation_config == "auto":  # the model's file, or the default model's defaults
        found = source.generation_config()
    elif args.generation_config != "vllm":
        path = os.path.join(args.generation_config, "generation_config.json")
        if os.path.isfile(path):
            import json

            with open(path) as f:
                found = json.load(f)
    found.update(args.override_generation_config or {})
    defaults = {ours: found[theirs] for theirs, ours in _GENERATION_KEYS.items()
                if found.get(theirs) is not None}
    if defaults:
        logger.info("default sampling parameters from the generation config: %s (use "
                    "--generation-config vllm to ignore it)", defaults)
    return defaults


__all__ = ["LLMEngine", "FinishReason", "enable_compilation_cache"]
