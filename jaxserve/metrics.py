"""Prometheus metrics under vLLM's names, so vLLM's dashboards and alerts work unchanged.

The engine thread records into a `Metrics` (prometheus-client metrics are thread-safe); the server
exposes its registry at `GET /metrics`. Each server has its own registry, so two servers in one
process (tests) do not mix their counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# vLLM's histogram buckets (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                  100000)
_PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                  120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_N_BUCKETS = (1, 2, 5, 10, 20)

# attribute: (vLLM's name, help, buckets) of each per-request or per-step histogram.
_HISTOGRAMS = {
    "ttft": ("vllm:time_to_first_token_seconds", "Time to first token in seconds.",
             _TTFT_BUCKETS),
    "itl": ("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", _ITL_BUCKETS),
    "e2e": ("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
            _E2E_BUCKETS),
    "request_prompt_tokens": ("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                              _TOKEN_BUCKETS),
    "request_generation_tokens": ("vllm:request_generation_tokens",
                                  "Generated tokens per finished request.", _TOKEN_BUCKETS),
    "iteration_tokens": ("vllm:iteration_tokens_total", "Tokens per engine step.",
                         _TOKEN_BUCKETS),
    "queue_time": ("vllm:request_queue_time_seconds", "Time from arrival to first scheduling.",
                   _PHASE_BUCKETS),
    "prefill_time": ("vllm:request_prefill_time_seconds",
                     "Time from first scheduling to first token.", _PHASE_BUCKETS),
    "decode_time": ("vllm:request_decode_time_seconds", "Time from first token to the last.",
                    _PHASE_BUCKETS),
    "inference_time": ("vllm:request_inference_time_seconds",
                       "Time from first scheduling to the last token.", _PHASE_BUCKETS),
    "tpot": ("vllm:request_time_per_output_token_seconds",
             "Mean time per output token after the first, per request.", _TPOT_BUCKETS),
    "params_max_tokens": ("vllm:request_params_max_tokens", "The max_tokens of finished requests.",
                          _TOKEN_BUCKETS),
    "params_n": ("vllm:request_params_n", "The n of finished requests.", _N_BUCKETS),
}


class Metrics:
    """The engine's counters, gauges and latency histograms, labelled with the model name."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None,
                 cache_info: dict[str, str] | None = None):
        if registry is None:
            registry = CollectorRegistry()
            # The process_*, python_* and python_gc_* families a default registry has.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        labels = ["model_name"]
        r = self.registry

        def counter(name, doc, extra=()):
            return Counter(name, doc, labels + list(extra), registry=r)

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.").labels(
            model_name)
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Generation tokens processed.").labels(model_name)
        self.preemptions = counter("vllm:num_preemptions", "Cumulative preemptions.").labels(
            model_name)
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in tokens.").labels(model_name)
        self.prefix_hits = counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in tokens.").labels(model_name)
        self._success = counter("vllm:request_success", "Finished requests, by reason.",
                                ["finished_reason"])
        self._model = model_name
        self.running = gauge("vllm:num_requests_running", "Requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc",
                              "KV-cache usage; 1 means 100 percent usage.")
        self.prefix_hit_rate = gauge("vllm:prefix_cache_hit_rate",
                                     "Prefix cache hit rate since start (hits / queries).")
        for attr, (name, doc, buckets) in _HISTOGRAMS.items():
            setattr(self, attr, histogram(name, doc, buckets))
        self.prompt_tokens_cached = counter("vllm:prompt_tokens_cached",
                                            "Prompt tokens served from the prefix cache.").labels(
            model_name)
        # HTTP traffic, under the names vLLM's FastAPI instrumentation uses.
        self.http_requests = Counter("http_requests", "HTTP requests, by handler, method and "
                                     "status class.", ["handler", "method", "status"],
                                     registry=r)
        self.http_duration = Histogram("http_request_duration_seconds", "HTTP request latency "
                                       "(to the end of the response body).",
                                       ["handler", "method"], registry=r)
        if cache_info:
            info = Gauge("vllm:cache_config_info", "The KV cache's configuration.",
                         sorted(cache_info), registry=r)
            info.labels(**cache_info).set(1)
        self._last_queries = self._last_hits = self._last_preemptions = 0

    # ---- called by the engine thread -------------------------------------------------------
    def record_step(self, *, prompt_tokens: int, generation_tokens: int, running: int,
                    waiting: int, kv_usage: float, prefix_queries: int, prefix_hits: int,
                    preemptions: int) -> None:
        """Per step; the prefix-cache and preemption arguments are running totals."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        if prompt_tokens or generation_tokens:
            self.iteration_tokens.observe(prompt_tokens + generation_tokens)
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        self.prefix_queries.inc(prefix_queries - self._last_queries)
        self.prefix_hits.inc(prefix_hits - self._last_hits)
        self.preemptions.inc(preemptions - self._last_preemptions)
        self._last_queries, self._last_hits = prefix_queries, prefix_hits
        self._last_preemptions = preemptions
        self.prefix_hit_rate.set(prefix_hits / prefix_queries if prefix_queries else 0.0)

    def record_token(self, arrival: float, previous: float | None, now: float) -> None:
        """A sampled token: the first one of a request is TTFT, later ones are inter-token."""
        if previous is None:
            self.ttft.observe(now - arrival)
        else:
            self.itl.observe(now - previous)

    def record_finished(self, reason: str, timing, now: float, prompt_tokens: int,
                        generation_tokens: int, max_tokens: int | None, n: int) -> None:
        """A finished (or aborted) request; `timing` is its `RequestMetrics`."""
        self._success.labels(self._model, reason).inc()
        self.e2e.observe(now - timing.arrival_time)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)
        self.prompt_tokens_cached.inc(timing.num_cached_tokens)
        if max_tokens is not None:
            self.params_max_tokens.observe(max_tokens)
        self.params_n.observe(n)
        scheduled, first = timing.first_scheduled_time, timing.first_token_time
        if scheduled is not None:
            self.queue_time.observe(scheduled - timing.arrival_time)
            self.inference_time.observe(now - scheduled)
            if first is not None:
                self.prefill_time.observe(first - scheduled)
        if first is not None:
            self.decode_time.observe(now - first)
            if generation_tokens > 1:
                self.tpot.observe((now - first) / (generation_tokens - 1))
