"""`jaxserve serve` arguments: every `vllm serve` flag and SGLang's spellings of the same options.

What jaxserve does with each flag (`Flag.kind`):
- engine, frontend, worker: a field of `EngineArgs`, or an option the HTTP server (or the Gateway
  client) reads from the namespace; implicit: a flag that asks for what jaxserve always does;
- mapped, alias: translated onto a JAX counterpart (CUDA-graph sizes become compiled token
  buckets, `--rope-theta` an `hf_overrides` key) or an SGLang spelling of a vLLM flag;
- warn: no meaning on JAX; a non-default value logs one line on the `jaxserve.cli` logger;
- refuse: meaningful but not implemented yet; a non-default value raises `ValueError` naming the
  flag as it was typed.
Default values (and `--no-X` for a refused `--X`) always pass silently.

Before argparse sees the arguments, three rewrites run, in order: `--config FILE.yaml` becomes flags
placed before the command line (so the command line wins); `--flag true/false` becomes `--flag` /
`--no-flag`; and JSON-valued flags given as dotted keys (`--compilation-config.level 3`,
`-cc.cudagraph_capture_sizes+ 8`) or as `-O3` are folded into one JSON object per flag.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxserve.sampling_params import MAX_LOGPROBS

logger = logging.getLogger("jaxserve.cli")

ENGINE, FRONTEND, IMPLICIT, WORKER = "engine", "frontend", "implicit", "worker"
MAPPED, ALIAS, WARN, REFUSE = "mapped", "alias", "warn", "refuse"
SWITCH = bool  # `Flag.type` of a boolean flag: `--x` / `--no-x`


# ----------------------------------------------------------------------------- value parsers
def human_int(text: str) -> int:
    """vLLM's readable integers: 1k = 1000, 1K = 1024, 25.6k = 25600; -1 and `auto` are -1."""
    text = text.strip()
    if text.lower() == "auto":
        return -1
    m = re.fullmatch(r"(-?[0-9.]+)([kmgtKMGT]?)", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    number, suffix = m.groups()
    scale = (1000 if suffix.islower() else 1024) ** ("kmgt".index(suffix.lower()) + 1) \
        if suffix else 1
    return int(float(number) * scale)


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (vLLM's config-valued flags)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def compilation_json(text: str) -> dict[str, Any]:
    """`--compilation-config`: a JSON object, or a bare number (`-O3`): the compilation level."""
    if text.strip().isdigit():
        return {"level": int(text)}
    return json_object(text)


def json_list(text: str) -> list[Any]:
    """A JSON list (`--allowed-origins '["*"]'`); a bare value is a list of one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return [text]  # a single bare value, e.g. --allowed-origins http://a.example
    return value if isinstance(value, list) else [value]


def mm_limits(text: str) -> dict[str, Any]:
    """`--limit-mm-per-prompt`: JSON, or the older `image=16,video=2`."""
    if "=" in text and not text.lstrip().startswith("{"):
        return {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    return json_object(text)


def _none_or(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text in ("None", "none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


optional_str = _none_or(str)


# ----------------------------------------------------------------------------- the flag table
@dataclass(frozen=True)
class Flag:
    """One command-line flag: its spellings, what jaxserve does with it, and how it parses."""

    names: tuple[str, ...]  # option strings; the first is the canonical spelling
    kind: str  # ENGINE, FRONTEND, IMPLICIT, WORKER, MAPPED, ALIAS, WARN or REFUSE
    note: str  # what jaxserve does with it (help text; the reason in warnings and refusals)
    type: Any = str  # SWITCH for a boolean flag
    default: Any = None
    nargs: str | None = None
    dest: str | None = None
    choices: tuple[str, ...] | None = None
    action: str | None = None  # "append" or "store_const"
    const: Any = None
    ok: Any = ()  # WARN/REFUSE: further values that pass silently, or a predicate

    @property
    def key(self) -> str:
        return self.dest or self.names[0].lstrip("-").replace("-", "_")

    def is_neutral(self, value: Any) -> bool:
        """Whether `value` asks for nothing beyond the default (no warning, no refusal)."""
        if callable(self.ok):
            return self.ok(value)
        if value is None or value == self.default or value in ((), [], {}, ""):
            return True
        return any(value == v for v in self.ok)


_UNSET = object()


def F(kind: str, names: str, note: str, type: Any = str, default: Any = _UNSET,
      **extra: Any) -> Flag:
    """Compact table rows: `names` is space-separated; `type=SWITCH` for booleans, which default
    to False unless the row says otherwise."""
    if default is _UNSET:
        default = False if type is SWITCH else None
    return Flag(tuple(names.split()), kind, note, type, default, **extra)


def _no_mm(value: Any) -> bool:
    return not value or all(not (v.get("count", 0) if isinstance(v, dict) else v)
                            for v in value.values())


_TEXT_ONLY = "jaxserve serves text-only models"
_MM = "multimodal inputs"
_CUDA_GRAPH = "XLA compiles every token bucket at start-up; there are no CUDA graphs"
_ONE_PROC = "jaxserve runs the model in one process"
_NCCL = "XLA's collectives replace NCCL and custom all-reduce kernels"
_KERNEL = "a CUDA kernel choice; jaxserve's kernels are XLA and Pallas"
_SPEC = "speculative decoding"
_LORA = "LoRA adapters"
_DP = "data parallelism across processes"
_EPLB = "expert-parallel load balancing"
_CP = "context parallelism"
_OFFLOAD = "CPU offload"
_DISAGG = "prefill/decode disaggregation"
_SO = "structured outputs (a later issue)"
_HIST = "custom metric histogram buckets"

GROUPS: tuple[tuple[str, str, tuple[Flag, ...]], ...] = (
    ("Frontend", "The OpenAI-compatible HTTP server.", (
        F(FRONTEND, "--host", "host to bind (default: all interfaces; SGLang dialect 127.0.0.1)"),
        F(FRONTEND, "--port", "port to bind (default: 8000; SGLang dialect 30000)", int),
        F(FRONTEND, "--uvicorn-log-level", "uvicorn's log level", default="info",
          choices=("debug", "info", "warning", "error", "critical", "trace")),
        F(FRONTEND, "--disable-uvicorn-access-log", "no access log lines", SWITCH),
        F(FRONTEND, "--allow-credentials", "CORS: allow credentials", SWITCH),
        F(FRONTEND, "--allowed-origins", "CORS origins (JSON list)", json_list, ["*"]),
        F(FRONTEND, "--allowed-methods", "CORS methods (JSON list)", json_list, ["*"]),
        F(FRONTEND, "--allowed-headers", "CORS headers (JSON list)", json_list, ["*"]),
        F(FRONTEND, "--api-key", "require this bearer key (also env VLLM_API_KEY)"),
        F(FRONTEND, "--root-path", "ASGI root_path behind a path-routing proxy"),
        F(FRONTEND, "--ssl-keyfile", "TLS private key (PEM)"),
        F(FRONTEND, "--ssl-certfile", "TLS certificate (PEM)"),
        F(FRONTEND, "--ssl-ca-certs", "CA certificates for client verification"),
        F(FRONTEND, "--ssl-cert-reqs", "client certificate requirement (Python ssl.CERT_*)", int,
          0),
        F(REFUSE, "--enable-ssl-refresh", "reloading TLS certificates when they change", SWITCH),
        F(FRONTEND, "--enable-request-id-headers", "add X-Request-Id to responses", SWITCH),
        F(FRONTEND, "--max-log-len", "characters/ids of prompts shown in request logs", int),
        F(FRONTEND, "--enable-log-requests", "log each request", SWITCH),
        F(ALIAS, "--disable-log-requests", "deprecated: request logging is off unless "
          "--enable-log-requests", dest="enable_log_requests", action="store_const",
          const=False, default=argparse.SUPPRESS),
        F(FRONTEND, "--disable-fastapi-docs", "no /docs, /redoc or /openapi.json", SWITCH),
        F(FRONTEND, "--chat-template", "chat template file or inline Jinja (engine and server)"),
        F(FRONTEND, "--chat-template-content-format", "how message content reaches the template",
          default="auto", choices=("auto", "string", "openai")),
        F(FRONTEND, "--response-role", "role of generated chat messages", default="assistant"),
        F(FRONTEND, "--return-tokens-as-token-ids", "logprob tokens as 'token_id:N'", SWITCH),
        F(FRONTEND, "--middleware", "extra ASGI middleware (import path; repeatable)",
          action="append", default=[]),
        F(FRONTEND, "--enable-prompt-tokens-details", "usage.prompt_tokens_details", SWITCH),
        F(FRONTEND, "--enable-force-include-usage", "usage in every response", SWITCH),
        F(FRONTEND, "--enable-server-load-tracking", "track in-flight requests", SWITCH),
        F(FRONTEND, "--log-config-file", "logging.config.dictConfig JSON file for jaxserve"),
        F(IMPLICIT, "--disable-frontend-multiprocessing",
          "always: the server and the engine loop share one process", SWITCH),
        F(REFUSE, "--api-server-count -asc", "several API server processes", int, 1,
          ok=lambda v: v is None or v <= 1),
        F(REFUSE, "--lora-modules", _LORA, nargs="+"),
        F(REFUSE, "--prompt-adapters", "prompt adapters", nargs="+"),
        F(REFUSE, "--enable-auto-tool-choice", "tool calling (a later issue)", SWITCH),
        F(REFUSE, "--tool-call-parser", "tool calling (a later issue)"),
        F(REFUSE, "--tool-parser-plugin", "tool calling (a later issue)", default=""),
    )),
    ("EngineArgs", "Engine-wide options.", (
        F(ENGINE, "--disable-log-stats", "no periodic throughput log lines", SWITCH),
        F(WARN, "--aggregate-engine-logging", "only meaningful with data parallelism", SWITCH),
        F(WARN, "--fail-on-environ-validation", "vLLM's environment-variable checks", SWITCH),
        F(FRONTEND, "--shutdown-timeout", "seconds to drain requests on shutdown (0: abort)", int,
          0),
        F(WARN, "--gdn-prefill-backend", _KERNEL),
    )),
    ("ModelConfig", "The model.", (
        F(ENGINE, "--model", "HF repo id, local folder or .gguf file (default: "
          "SmolLM2-135M-Instruct); may also be given as the positional MODEL"),
        F(REFUSE, "--task", "tasks other than generate (pooling models)", default="auto",
          ok=("generate",)),
        F(REFUSE, "--runner", "runners other than generate", default="auto", ok=("generate",)),
        F(REFUSE, "--convert", "converting models for pooling", default="auto", ok=("none",)),
        F(ENGINE, "--tokenizer", "tokenizer name or folder (default: the model's)"),
        F(REFUSE, "--tokenizer-mode", "tokenizer modes other than auto and hf", default="auto",
          ok=("hf",)),
        F(ENGINE, "--trust-remote-code", "allow HF remote code when reading configs", SWITCH),
        F(ENGINE, "--dtype", "auto, bfloat16, float16/half, float32/float", default="auto"),
        F(ENGINE, "--seed", "random seed", int, 0),
        F(REFUSE, "--hf-config-path", "reading config.json from another repo"),
        F(REFUSE, "--allowed-local-media-path", _MM, default=""),
        F(REFUSE, "--allowed-media-domains", _MM, nargs="+"),
        F(ENGINE, "--revision", "model revision (branch, tag or commit)"),
        F(WARN, "--code-revision", "jaxserve runs its own JAX model code, never the repo's"),
        F(REFUSE, "--tokenizer-revision", "a tokenizer revision apart from --revision"),
        F(ENGINE, "--max-model-len", "context length (1k, 2K, ...; -1/auto: the model's)",
          human_int),
        F(REFUSE, "--quantization -q", "quantized weights", optional_str),
        F(WARN, "--allow-deprecated-quantization", "jaxserve has no quantization yet", SWITCH),
        F(ENGINE, "--enforce-eager", "no start-up compilation: jit lazily (debugging)", SWITCH),
        F(REFUSE, "--enable-return-routed-experts", "returning routed experts", SWITCH),
        F(ENGINE, "--max-logprobs", "most logprobs a request may ask for (at most 20; -1: 20)",
          int, 20),
        F(REFUSE, "--logprobs-mode", "logprobs modes other than raw_logprobs",
          default="raw_logprobs"),
        F(REFUSE, "--disable-sliding-window", "capping context at the sliding window", SWITCH),
        F(WARN, "--disable-cascade-attn", "jaxserve has no cascade attention", SWITCH, default=None,
          ok=(True,)),
        F(REFUSE, "--skip-tokenizer-init", "serving without a tokenizer", SWITCH),
        F(REFUSE, "--enable-prompt-embeds", "prompt embeddings as input", SWITCH),
        F(FRONTEND, "--served-model-name", "names the API answers to; the first is reported",
          nargs="+"),
        F(REFUSE, "--config-format", "mistral-format configs", default="auto", ok=("hf",)),
        F(MAPPED, "--hf-token", "sets HF_TOKEN for hub downloads (alone: the saved login)",
          nargs="?", const=True),
        F(ENGINE, "--hf-overrides", "keys laid over config.json (JSON)", json_object),
        F(REFUSE, "--pooler-config", "pooling models", json_object),
        F(REFUSE, "--override-pooler-config", "pooling models", json_object),
        F(WARN, "--override-neuron-config", "AWS Neuron devices only", json_object),
        F(ENGINE, "--generation-config", "auto (the model's), vllm (neutral) or a folder",
          default="auto"),
        F(ENGINE, "--override-generation-config", "default sampling parameters (JSON)",
          json_object),
        F(REFUSE, "--enable-sleep-mode", "sleep mode", SWITCH),
        F(WARN, "--model-impl", "jaxserve always runs its own JAX implementation",
          default="auto", ok=("vllm",)),
        F(REFUSE, "--override-attention-dtype", "a separate attention dtype"),
        F(REFUSE, "--logits-processors", "custom logits processors", nargs="+"),
        F(REFUSE, "--logits-processor-pattern", "custom logits processors"),
        F(REFUSE, "--io-processor-plugin", "IO processor plugins"),
        F(WARN, "--renderer-num-workers", "the server renders prompts on its event loop", int,
          1),
        F(MAPPED, "--rope-scaling", "-> hf_overrides rope_scaling (JSON)", json_object),
        F(MAPPED, "--rope-theta", "-> hf_overrides rope_theta", float),
        F(WARN, "--max-seq-len-to-capture", _CUDA_GRAPH, int, 8192),
        F(WARN, "--disable-async-output-proc", "outputs are processed after every step", SWITCH),
        F(WARN, "--tokenizer-pool-size", "removed from vLLM; jaxserve tokenizes in the server",
          int, 0),
        F(WARN, "--tokenizer-pool-type", "removed from vLLM", default="ray"),
        F(WARN, "--tokenizer-pool-extra-config", "removed from vLLM", json_object),
    )),
    ("LoadConfig", "Loading weights.", (
        F(ENGINE, "--load-format", "auto, safetensors, pt, gguf, orbax, dummy", default="auto"),
        F(ENGINE, "--download-dir", "where hub downloads go (default: the HF cache)"),
        F(WARN, "--safetensors-load-strategy", "jaxserve memory-maps safetensors"),
        F(REFUSE, "--model-loader-extra-config", "loader plugins", json_object),
        F(WARN, "--ignore-patterns", "jaxserve reads only the weight files its loader needs",
          nargs="+"),
        F(WARN, "--use-tqdm-on-load", "progress bars are always shown", SWITCH, True),
        F(WARN, "--pt-load-map-location", "PyTorch files are always read on the host",
          default="cpu"),
        F(REFUSE, "--qlora-adapter-name-or-path", _LORA),
    )),
    ("AttentionConfig", "Attention kernels.", (
        F(ENGINE, "--attention-backend", "ref, cpu, tpu or gpu (default: the fastest here)"),
    )),
    ("StructuredOutputsConfig", "Structured outputs and reasoning.", (
        F(REFUSE, "--reasoning-parser", "reasoning parsers (a later issue)", default=""),
        F(REFUSE, "--reasoning-parser-plugin", "reasoning parsers (a later issue)", default=""),
        F(REFUSE, "--enable-reasoning", "reasoning parsers (a later issue)", SWITCH),
        F(REFUSE, "--guided-decoding-backend", _SO, default="auto", ok=("xgrammar",)),
        F(REFUSE, "--guided-decoding-disable-fallback", _SO, SWITCH),
        F(REFUSE, "--guided-decoding-disable-any-whitespace", _SO, SWITCH),
        F(REFUSE, "--guided-decoding-disable-additional-properties", _SO, SWITCH),
    )),
    ("ParallelConfig", "Distributed execution.", (
        F(WARN, "--distributed-executor-backend", _ONE_PROC),
        F(ENGINE, "--pipeline-parallel-size -pp", "pipeline stages (1 for now)", int, 1),
        F(ENGINE, "--tensor-parallel-size -tp", "tensor-parallel devices (1 for now)", int, 1),
        F(ENGINE, "--data-parallel-size -dp", "data-parallel replicas (1 for now)", int, 1),
        F(ENGINE, "--enable-expert-parallel -ep", "expert parallelism for MoE (not yet)", SWITCH),
        F(REFUSE, "--master-addr", "multi-host serving", default="127.0.0.1"),
        F(REFUSE, "--master-port", "multi-host serving", int, 29501),
        F(REFUSE, "--nnodes -n", "multi-host serving", int, 1),
        F(REFUSE, "--node-rank -r", "multi-host serving", int, 0),
        F(WARN, "--distributed-timeout-seconds", "there is no torch.distributed group", int),
        F(WARN, "--numa-bind", _ONE_PROC, SWITCH),
        F(WARN, "--numa-bind-nodes", _ONE_PROC, int, nargs="+"),
        F(WARN, "--numa-bind-cpus", _ONE_PROC, nargs="+"),
        F(REFUSE, "--decode-context-parallel-size -dcp", _CP, int, 1),
        F(REFUSE, "--dcp-comm-backend", _CP, default="ag_rs"),
        F(REFUSE, "--dcp-kv-cache-interleave-size", _CP, int, 1),
        F(REFUSE, "--cp-kv-cache-interleave-size", _CP, int, 1),
        F(REFUSE, "--prefill-context-parallel-size -pcp", _CP, int, 1),
        F(REFUSE, "--data-parallel-rank -dpn", _DP, int),
        F(REFUSE, "--data-parallel-start-rank -dpr", _DP, int),
        F(REFUSE, "--data-parallel-size-local -dpl", _DP, int),
        F(REFUSE, "--data-parallel-address -dpa", _DP),
        F(REFUSE, "--data-parallel-rpc-port -dpp", _DP, int),
        F(REFUSE, "--data-parallel-backend -dpb", _DP, default="mp"),
        F(REFUSE, "--data-parallel-hybrid-lb -dph", _DP, SWITCH),
        F(REFUSE, "--data-parallel-external-lb -dpe", _DP, SWITCH),
        F(REFUSE, "--enable-ep-weight-filter", "expert parallelism", SWITCH),
        F(WARN, "--all2all-backend", _NCCL),
        F(REFUSE, "--enable-dbo", "dual-batch overlap", SWITCH),
        F(REFUSE, "--ubatch-size", "dual-batch overlap", int, 0),
        F(REFUSE, "--enable-elastic-ep", "elastic expert parallelism", SWITCH),
        F(REFUSE, "--dbo-decode-token-threshold", "dual-batch overlap", int, 32),
        F(REFUSE, "--dbo-prefill-token-threshold", "dual-batch overlap", int, 512),
        F(WARN, "--disable-nccl-for-dp-synchronization", _NCCL, SWITCH),
        F(REFUSE, "--enable-eplb", _EPLB, SWITCH),
        F(REFUSE, "--eplb-config", _EPLB, json_object),
        F(REFUSE, "--expert-placement-strategy", "expert parallelism", default="linear"),
        F(WARN, "--max-parallel-loading-workers", "weights load in one process", int),
        F(WARN, "--ray-workers-use-nsight", "no Ray workers", SWITCH),
        F(WARN, "--disable-custom-all-reduce", _NCCL, SWITCH),
        F(WARN, "--worker-cls", "vLLM's Python worker classes", default="auto"),
        F(WARN, "--worker-extension-cls", "vLLM's Python worker classes", default=""),
    )),
    ("CacheConfig", "The paged KV cache.", (
        F(ENGINE, "--block-size", "tokens per KV page (default 16)", int),
        F(ENGINE, "--gpu-memory-utilization", "fraction of device memory for weights and KV "
          "cache", float, 0.9),
        F(ENGINE, "--kv-cache-memory-bytes", "KV cache size in bytes (4G, ...); overrides "
          "--gpu-memory-utilization", human_int),
        F(ENGINE, "--kv-cache-dtype", "auto (the model's), bfloat16 or float32", default="auto"),
        F(ENGINE, "--num-gpu-blocks-override", "number of KV pages", int),
        F(ENGINE, "--enable-prefix-caching", "reuse KV pages of shared prefixes", SWITCH, True),
        F(ENGINE, "--prefix-caching-hash-algo", "hash of page contents", default="sha256"),
        F(WARN, "--swap-space", "preemption recomputes; nothing is swapped", float, 4.0),
        F(REFUSE, "--calculate-kv-scales", "fp8 KV cache", SWITCH),
        F(REFUSE, "--kv-cache-dtype-skip-layers", "KV cache quantization", nargs="+"),
        F(WARN, "--kv-sharing-fast-prefill", "unfinished in vLLM too; no effect", SWITCH),
        F(WARN, "--mamba-cache-dtype", "no Mamba models in jaxserve", default="auto"),
        F(WARN, "--mamba-ssm-cache-dtype", "no Mamba models in jaxserve", default="auto"),
        F(WARN, "--mamba-block-size", "no Mamba models in jaxserve", int),
        F(WARN, "--mamba-cache-mode", "no Mamba models in jaxserve", ok=("none",)),
        F(WARN, "--enable-mamba-cache-stochastic-rounding", "no Mamba models in jaxserve",
          SWITCH),
        F(WARN, "--mamba-cache-philox-rounds", "no Mamba models in jaxserve", int, 0),
        F(REFUSE, "--kv-offloading-size", "KV cache offloading", float),
        F(REFUSE, "--kv-offloading-backend", "KV cache offloading", default="native"),
    )),
    ("OffloadConfig", "Offloading weights to host memory.", (
        F(REFUSE, "--cpu-offload-gb", _OFFLOAD, float, 0),
        F(REFUSE, "--cpu-offload-params", _OFFLOAD, nargs="+"),
        F(REFUSE, "--offload-backend", _OFFLOAD, default="auto"),
        F(REFUSE, "--offload-group-size", _OFFLOAD, int, 0),
        F(REFUSE, "--offload-num-in-group", _OFFLOAD, int, 1),
        F(REFUSE, "--offload-prefetch-step", _OFFLOAD, int, 1),
        F(REFUSE, "--offload-params", _OFFLOAD, nargs="+"),
    )),
    ("MultiModalConfig", "Multimodal models.", (
        F(IMPLICIT, "--language-model-only", "always: " + _TEXT_ONLY, SWITCH),
        F(REFUSE, "--limit-mm-per-prompt", _MM + "; all-zero limits pass", mm_limits,
          ok=_no_mm),
        F(REFUSE, "--enable-mm-embeds", _MM, SWITCH),
        F(REFUSE, "--media-io-kwargs", _MM, json_object),
        F(REFUSE, "--mm-processor-kwargs", _MM, json_object),
        F(WARN, "--mm-processor-cache-gb", _TEXT_ONLY, float, 4.0),
        F(WARN, "--mm-processor-cache-type", _TEXT_ONLY, default="lru"),
        F(WARN, "--mm-shm-cache-max-object-size-mb", _TEXT_ONLY, int, 128),
        F(REFUSE, "--mm-encoder-only", _MM, SWITCH),
        F(WARN, "--mm-encoder-tp-mode", _TEXT_ONLY, default="weights"),
        F(WARN, "--mm-encoder-attn-backend", _TEXT_ONLY),
        F(WARN, "--interleave-mm-strings", _TEXT_ONLY, SWITCH),
        F(WARN, "--skip-mm-profiling", _TEXT_ONLY, SWITCH),
        F(REFUSE, "--video-pruning-rate", _MM, float),
        F(WARN, "--mm-tensor-ipc", _TEXT_ONLY, default="direct_rpc"),
        F(WARN, "--disable-mm-preprocessor-cache", _TEXT_ONLY, SWITCH),
    )),
    ("LoRAConfig", "LoRA and prompt adapters.", (
        F(REFUSE, "--enable-lora", _LORA, SWITCH),
        F(REFUSE, "--enable-lora-bias", _LORA, SWITCH),
        F(REFUSE, "--max-loras", _LORA, int, 1),
        F(REFUSE, "--max-lora-rank", _LORA, int, 16),
        F(REFUSE, "--lora-extra-vocab-size", _LORA, int, 256),
        F(REFUSE, "--lora-dtype", _LORA, default="auto"),
        F(REFUSE, "--enable-tower-connector-lora", _LORA, SWITCH),
        F(REFUSE, "--long-lora-scaling-factors", _LORA, float, nargs="+"),
        F(REFUSE, "--max-cpu-loras", _LORA, int),
        F(REFUSE, "--fully-sharded-loras", _LORA, SWITCH),
        F(REFUSE, "--lora-target-modules", _LORA, nargs="+"),
        F(REFUSE, "--default-mm-loras", _LORA, json_object),
        F(REFUSE, "--specialize-active-lora", _LORA, SWITCH),
        F(REFUSE, "--enable-prompt-adapter", "prompt adapters", SWITCH),
        F(REFUSE, "--max-prompt-adapters", "prompt adapters", int, 1),
        F(REFUSE, "--max-prompt-adapter-token", "prompt adapters", int, 0),
    )),
    ("ObservabilityConfig", "Metrics and tracing.", (
        F(WARN, "--show-hidden-metrics-for-version", "jaxserve exports no hidden metrics"),
        F(REFUSE, "--otlp-traces-endpoint", "OpenTelemetry tracing"),
        F(REFUSE, "--collect-detailed-traces", "OpenTelemetry tracing", optional_str,
          nargs="+", ok=([None],)),
        F(REFUSE, "--kv-cache-metrics", "KV cache residency metrics", SWITCH),
        F(REFUSE, "--kv-cache-metrics-sample", "KV cache residency metrics", float, 0.01),
        F(WARN, "--cudagraph-metrics", _CUDA_GRAPH, SWITCH),
        F(WARN, "--enable-layerwise-nvtx-tracing", "NVTX ranges are a CUDA profiler feature",
          SWITCH),
        F(REFUSE, "--enable-mfu-metrics", "model FLOPs utilisation metrics", SWITCH),
        F(REFUSE, "--enable-logging-iteration-details", "per-step detail logs", SWITCH),
    )),
    ("SchedulerConfig", "Continuous batching.", (
        F(ENGINE, "--max-num-batched-tokens", "token budget per step (the largest bucket)",
          human_int),
        F(ENGINE, "--max-num-seqs", "most sequences per step", int),
        F(ENGINE, "--max-num-partial-prefills", "prompts prefilled concurrently", int, 1),
        F(ENGINE, "--max-long-partial-prefills", "long prompts prefilled concurrently", int, 1),
        F(ENGINE, "--long-prefill-token-threshold", "prompt length counted as long", int, 0),
        F(ENGINE, "--scheduling-policy", "fcfs or priority", default="fcfs"),
        F(ENGINE, "--enable-chunked-prefill", "split long prompts across steps", SWITCH, True),
        F(WARN, "--disable-chunked-mm-input", _TEXT_ONLY, SWITCH),
        F(WARN, "--scheduler-cls", "vLLM's Python scheduler classes"),
        F(WARN, "--scheduler-reserve-full-isl", "jaxserve admits by the chunk it schedules and "
          "preempts by recompute", SWITCH, True),
        F(WARN, "--disable-hybrid-kv-cache-manager", "every layer has the same KV pages",
          SWITCH, default=None, ok=(True,)),
        F(REFUSE, "--async-scheduling", "asynchronous scheduling", SWITCH),
        F(REFUSE, "--stream-interval", "batching streamed tokens", int, 1),
        F(REFUSE, "--preemption-mode", "preemption by swapping (recompute is what jaxserve does)",
          ok=("recompute",)),
        F(REFUSE, "--num-lookahead-slots", _SPEC, int, 0),
        F(WARN, "--scheduler-delay-factor", "jaxserve admits waiting requests at every step",
          float, 0.0),
        F(WARN, "--num-scheduler-steps", "one scheduler call per compiled step", int, 1),
        F(WARN, "--multi-step-stream-outputs", "no multi-step scheduling", SWITCH, True),
        F(WARN, "--use-v2-block-manager", "a no-op in vLLM too", SWITCH, default=None, ok=(True,)),
        F(MAPPED, "--cuda-graph-sizes", "compile buckets: several values are the token counts "
          "to compile, one value is the largest (powers of two up to it)", int, nargs="+"),
    )),
    ("CompilationConfig", "Compiled shapes. jaxserve compiles the whole step with XLA for a fixed "
     "set of token-count buckets; vLLM's CUDA-graph sizes choose those buckets.", (
        F(MAPPED, "--compilation-config -O -cc", "JSON: cudagraph_capture_sizes and "
          "max_cudagraph_capture_size choose compile buckets, cache_dir the XLA cache; "
          "level/mode are accepted (XLA always compiles the whole step)", compilation_json),
        F(MAPPED, "--cudagraph-capture-sizes", "compile buckets (token counts)", int, nargs="+"),
        F(MAPPED, "--max-cudagraph-capture-size", "compile buckets: powers of two up to this",
          int),
    )),
    ("KernelConfig", "Kernel choices.", (
        F(WARN, "--kernel-config", _KERNEL, json_object),
        F(WARN, "--ir-op-priority", _KERNEL, json_object),
        F(WARN, "--enable-flashinfer-autotune", _KERNEL, SWITCH),
        F(WARN, "--moe-backend", _KERNEL, default="auto"),
    )),
    ("VllmConfig", "Feature configurations (JSON objects; dotted keys and + appends work).", (
        F(REFUSE, "--speculative-config -sc", _SPEC, json_object),
        F(REFUSE, "--kv-transfer-config", "KV cache transfer", json_object),
        F(REFUSE, "--kv-events-config", "KV cache events", json_object),
        F(REFUSE, "--ec-transfer-config", "encoder cache transfer", json_object),
        F(WARN, "--attention-config -ac", "CUDA attention kernel options; see "
          "--attention-backend", json_object),
        F(REFUSE, "--reasoning-config", "reasoning parsers (a later issue)", json_object),
        F(WARN, "--additional-config", "platform plugin options", json_object),
        F(REFUSE, "--structured-outputs-config", _SO, json_object),
        F(REFUSE, "--profiler-config", "the profiler endpoints", json_object),
        F(WARN, "--optimization-level", "XLA compiles every bucket at start-up at every level",
          int, 2),
        F(WARN, "--performance-mode", "CUDA graph and kernel presets", default="balanced"),
        F(REFUSE, "--weight-transfer-config", "weight transfer for RL", json_object),
        F(MAPPED, "--device", "sets JAX_PLATFORMS: cuda/gpu, tpu, cpu (auto: JAX's choice)",
          default="auto"),
    )),
    ("SpeculativeConfig (older vLLM)", "Speculative decoding flags of older releases.", (
        F(REFUSE, "--speculative-model", _SPEC),
        F(REFUSE, "--speculative-model-quantization", _SPEC),
        F(REFUSE, "--num-speculative-tokens", _SPEC, int),
        F(REFUSE, "--speculative-disable-mqa-scorer", _SPEC, SWITCH),
        F(REFUSE, "--speculative-draft-tensor-parallel-size -spec-draft-tp", _SPEC, int),
        F(REFUSE, "--speculative-max-model-len", _SPEC, int),
        F(REFUSE, "--speculative-disable-by-batch-size", _SPEC, int),
        F(REFUSE, "--ngram-prompt-lookup-max", _SPEC, int),
        F(REFUSE, "--ngram-prompt-lookup-min", _SPEC, int),
        F(REFUSE, "--spec-decoding-acceptance-method", _SPEC, default="rejection_sampler"),
        F(REFUSE, "--typical-acceptance-sampler-posterior-threshold", _SPEC, float),
        F(REFUSE, "--typical-acceptance-sampler-posterior-alpha", _SPEC, float),
        F(REFUSE, "--disable-logprobs-during-spec-decoding", _SPEC, SWITCH, default=None, ok=(True,)),
    )),
    ("SGLang spellings", "SGLang's `launch_server` options, mapped onto the flags above.", (
        F(ALIAS, "--model-path", "SGLang spelling of --model", dest="model", default=argparse.SUPPRESS),
        F(ALIAS, "--tokenizer-path", "SGLang spelling of --tokenizer", dest="tokenizer",
          default=argparse.SUPPRESS),
        F(ALIAS, "--tp-size --tp", "SGLang spelling of --tensor-parallel-size", int,
          dest="tensor_parallel_size", default=argparse.SUPPRESS),
        F(ALIAS, "--dp-size", "SGLang spelling of --data-parallel-size", int, dest="data_parallel_size",
          default=argparse.SUPPRESS),
        F(ALIAS, "--pp-size", "SGLang spelling of --pipeline-parallel-size", int, dest="pipeline_parallel_size",
          default=argparse.SUPPRESS),
        F(MAPPED, "--ep-size --expert-parallel-size", "> 1: --enable-expert-parallel", int, 1),
        F(MAPPED, "--enable-ep-moe", "= --enable-expert-parallel", SWITCH),
        F(ALIAS, "--context-length", "SGLang spelling of --max-model-len", int, dest="max_model_len",
          default=argparse.SUPPRESS),
        F(ALIAS, "--mem-fraction-static", "SGLang spelling of --gpu-memory-utilization", float,
          dest="gpu_memory_utilization", default=argparse.SUPPRESS),
        F(ALIAS, "--max-running-requests", "SGLang spelling of --max-num-seqs", int, dest="max_num_seqs",
          default=argparse.SUPPRESS),
        F(MAPPED, "--max-total-tokens", "KV pool size in tokens: --num-gpu-blocks-override "
          "= ceil(tokens / block size)", int),
        F(ALIAS, "--page-size", "SGLang spelling of --block-size", int, dest="block_size",
          default=argparse.SUPPRESS),
        F(MAPPED, "--chunked-prefill-size", "= --max-num-batched-tokens; -1 disables chunked "
          "prefill", int),
        F(WARN, "--max-prefill-tokens", "the step budget is --max-num-batched-tokens "
          "(SGLang --chunked-prefill-size)", int, 16384),
        F(ALIAS, "--random-seed", "SGLang spelling of --seed", int, dest="seed", default=argparse.SUPPRESS),
        F(MAPPED, "--schedule-policy", "fcfs (lpm, random, dfs-weight, lof: not implemented)",
          default="fcfs"),
        F(MAPPED, "--disable-radix-cache", "= --no-enable-prefix-caching", SWITCH),
        F(MAPPED, "--disable-cuda-graph", "= --enforce-eager", SWITCH),
        F(MAPPED, "--cuda-graph-max-bs", "compile buckets: powers of two up to this", int),
        F(MAPPED, "--cuda-graph-bs", "compile buckets (token counts)", int, nargs="+"),
        F(MAPPED, "--json-model-override-args", "-> --hf-overrides (JSON)", json_object),
        F(MAPPED, "--enable-cache-report", "= --enable-prompt-tokens-details", SWITCH),
        F(FRONTEND, "--enable-metrics", "Prometheus /metrics (always on in the vLLM dialect)",
          SWITCH, None),
        F(FRONTEND, "--log-level", "root log level", default="info"),
        F(MAPPED, "--log-level-http", "= --uvicorn-log-level"),
        F(ALIAS, "--log-requests", "SGLang spelling of --enable-log-requests", SWITCH,
          dest="enable_log_requests", default=argparse.SUPPRESS),
        F(WARN, "--log-requests-level", "requests are logged as vLLM logs them", int, 0),
        F(IMPLICIT, "--enable-mixed-chunk", "always: each step mixes decodes and prefill chunks",
          SWITCH),
        F(WARN, "--skip-server-warmup", "buckets are compiled at start-up, before serving",
          SWITCH),
        F(REFUSE, "--grammar-backend", _SO, default="xgrammar"),
        F(WARN, "--enable-torch-compile", "XLA compiles the whole step already", SWITCH),
        F(WARN, "--torch-compile-max-bs", "XLA compiles the whole step already", int, 32),
        F(REFUSE, "--torchao-config", "quantized weights", default=""),
        F(REFUSE, "--allow-auto-truncate", "truncating over-long prompts", SWITCH),
        F(WARN, "--base-gpu-id", "use CUDA_VISIBLE_DEVICES to pick devices", int, 0),
        F(WARN, "--gpu-id-step", "use CUDA_VISIBLE_DEVICES to pick devices", int, 1),
        F(REFUSE, "--bucket-e2e-request-latency", _HIST, float, nargs="+"),
        F(REFUSE, "--bucket-inter-token-latency", _HIST, float, nargs="+"),
        F(REFUSE, "--bucket-time-to-first-token", _HIST, float, nargs="+"),
        F(REFUSE, "--collect-tokens-histogram", "token histograms", SWITCH),
        F(REFUSE, "--completion-template", "completion templates"),
        F(REFUSE, "--constrained-json-whitespace-pattern", _SO),
        F(REFUSE, "--crash-dump-folder", "crash dumps"),
        F(REFUSE, "--custom-weight-loader", "custom weight loaders", nargs="+"),
        F(REFUSE, "--debug-tensor-dump-inject", "tensor dumps", SWITCH),
        F(REFUSE, "--debug-tensor-dump-input-file", "tensor dumps"),
        F(REFUSE, "--debug-tensor-dump-output-folder", "tensor dumps"),
        F(REFUSE, "--debug-tensor-dump-prefill-only", "tensor dumps", SWITCH),
        F(WARN, "--decode-log-interval", "throughput is logged every few seconds", int, 40),
        F(WARN, "--deepep-config", _KERNEL),
        F(WARN, "--deepep-mode", _KERNEL, default="auto"),
        F(REFUSE, "--delete-ckpt-after-loading", "deleting checkpoints", SWITCH),
        F(WARN, "--disable-chunked-prefix-cache", _KERNEL, SWITCH),
        F(WARN, "--disable-cuda-graph-padding", _CUDA_GRAPH, SWITCH),
        F(WARN, "--disable-fast-image-processor", _TEXT_ONLY, SWITCH),
        F(WARN, "--disable-outlines-disk-cache", "no outlines in jaxserve", SWITCH),
        F(WARN, "--disable-overlap-cg-plan", _CUDA_GRAPH, SWITCH),
        F(WARN, "--disable-overlap-schedule", "jaxserve never overlaps scheduling with the step",
          SWITCH),
        F(WARN, "--disable-shared-experts-fusion", _KERNEL, SWITCH),
        F(REFUSE, "--disaggregation-bootstrap-port", _DISAGG, int, 8998),
        F(REFUSE, "--disaggregation-decode-dp", _DISAGG, int),
        F(REFUSE, "--disaggregation-decode-tp", _DISAGG, int),
        F(REFUSE, "--disaggregation-ib-device", _DISAGG),
        F(REFUSE, "--disaggregation-mode", _DISAGG, default="null"),
        F(REFUSE, "--disaggregation-prefill-pp", _DISAGG, int, 1),
        F(REFUSE, "--disaggregation-transfer-backend", _DISAGG, default="mooncake"),
        F(REFUSE, "--num-reserved-decode-tokens", _DISAGG, int, 512),
        F(REFUSE, "--pdlb-url", _DISAGG),
        F(REFUSE, "--dist-init-addr --nccl-init-addr", "multi-host serving"),
        F(WARN, "--dist-timeout", "there is no torch.distributed group", int),
        F(WARN, "--nccl-port", _NCCL, int),
        F(REFUSE, "--ds-channel-config-path", "double-sparsity attention"),
        F(REFUSE, "--ds-heavy-channel-num", "double-sparsity attention", int, 32),
        F(REFUSE, "--ds-heavy-channel-type", "double-sparsity attention", default="qk"),
        F(REFUSE, "--ds-heavy-token-num", "double-sparsity attention", int, 256),
        F(REFUSE, "--ds-sparse-decode-threshold", "double-sparsity attention", int, 4096),
        F(REFUSE, "--enable-double-sparsity", "double-sparsity attention", SWITCH),
        F(REFUSE, "--enable-custom-logit-processor", "custom logits processors", SWITCH),
        F(WARN, "--enable-deepep-moe", _KERNEL, SWITCH),
        F(REFUSE, "--enable-dp-attention", "data-parallel attention", SWITCH),
        F(REFUSE, "--enable-dp-lm-head", "data-parallel attention", SWITCH),
        F(REFUSE, "--enable-expert-distribution-metrics", _EPLB, SWITCH),
        F(WARN, "--enable-flashinfer-allreduce-fusion", _KERNEL, SWITCH),
        F(WARN, "--enable-flashinfer-moe", _KERNEL, SWITCH),
        F(REFUSE, "--enable-hierarchical-cache", "host-memory KV cache", SWITCH),
        F(REFUSE, "--hicache-io-backend", "host-memory KV cache", default=""),
        F(REFUSE, "--hicache-ratio", "host-memory KV cache", float, 2.0),
        F(REFUSE, "--hicache-size", "host-memory KV cache", int, 0),
        F(REFUSE, "--hicache-write-policy", "host-memory KV cache",
          default="write_through_selective"),
        F(REFUSE, "--hybrid-kvcache-ratio", "hybrid KV cache pools", float),
        F(REFUSE, "--enable-memory-saver", "releasing memory while idle (sleep mode)", SWITCH),
        F(WARN, "--enable-mscclpp", _NCCL, SWITCH),
        F(REFUSE, "--enable-multimodal", _MM, SWITCH),
        F(REFUSE, "--enable-nan-detection", "NaN detection", SWITCH),
        F(WARN, "--enable-nccl-nvls", _NCCL, SWITCH),
        F(WARN, "--enable-p2p-check", _NCCL, SWITCH),
        F(WARN, "--enable-profile-cuda-graph", _CUDA_GRAPH, SWITCH),
        F(REFUSE, "--enable-request-time-stats-logging", "per-request timing logs", SWITCH),
        F(REFUSE, "--enable-return-hidden-states", "returning hidden states", SWITCH),
        F(WARN, "--enable-tokenizer-batch-encode", "the server tokenizes per request", SWITCH),
        F(WARN, "--enable-triton-kernel-moe", _KERNEL, SWITCH),
        F(REFUSE, "--enable-two-batch-overlap", "two-batch overlap", SWITCH),
        F(REFUSE, "--ep-dispatch-algorithm", _EPLB),
        F(REFUSE, "--ep-num-redundant-experts", _EPLB, int, 0),
        F(REFUSE, "--eplb-algorithm", _EPLB, default="auto"),
        F(REFUSE, "--eplb-rebalance-layers-per-chunk", _EPLB, int),
        F(REFUSE, "--eplb-rebalance-num-iterations", _EPLB, int, 1000),
        F(REFUSE, "--expert-distribution-recorder-buffer-size", _EPLB, int),
        F(REFUSE, "--expert-distribution-recorder-mode", _EPLB),
        F(REFUSE, "--init-expert-location", _EPLB, default="trivial"),
        F(REFUSE, "--moe-dense-tp-size", "a separate TP size for dense MoE layers", int),
        F(REFUSE, "--file-storage-path", "the files API", default="sglang_storage"),
        F(WARN, "--flashinfer-mla-disable-ragged", _KERNEL, SWITCH),
        F(REFUSE, "--image-feature-size", _MM, int),
        F(REFUSE, "--image-input-shape", _MM),
        F(REFUSE, "--image-input-type", _MM),
        F(REFUSE, "--image-token-id", _MM, int),
        F(WARN, "--impl", "jaxserve always runs its own JAX implementation", default="auto"),
        F(REFUSE, "--is-embedding", "embedding models", SWITCH),
        F(REFUSE, "--load-balance-method", _DP, default="round_robin"),
        F(REFUSE, "--lora-backend", _LORA, default="triton"),
        F(REFUSE, "--lora-paths", _LORA, nargs="+"),
        F(REFUSE, "--max-loras-per-batch", _LORA, int, 8),
        F(WARN, "--max-context-len-to-capture", _CUDA_GRAPH, int, 8192),
        F(REFUSE, "--max-micro-batch-size", "pipeline parallelism", int),
        F(WARN, "--max-paddings", "removed from vLLM; padding follows the compile buckets", int,
          256),
        F(WARN, "--mm-attention-backend", _TEXT_ONLY),
        F(WARN, "--num-continuous-decode-steps", "one scheduler call per compiled step", int, 1),
        F(WARN, "--preferred-sampling-params", "no /get_model_info; see "
          "--override-generation-config"),
        F(REFUSE, "--quantization-param-path", "fp8 KV cache scales"),
        F(WARN, "--reorder-layers", "removed from vLLM", SWITCH),
        F(WARN, "--sampling-backend", "sampling runs inside the compiled step"),
        F(WARN, "--schedule-conservativeness", "jaxserve's admission rule is fixed", float, 1.0),
        F(WARN, "--show-time-cost", "SGLang's timing marks", SWITCH),
        F(WARN, "--sleep-on-idle", "the engine loop blocks while idle", SWITCH),
        F(REFUSE, "--speculative-accept-threshold-acc", _SPEC, float, 1.0),
        F(REFUSE, "--speculative-accept-threshold-single", _SPEC, float, 1.0),
        F(REFUSE, "--speculative-algorithm", _SPEC),
        F(REFUSE, "--speculative-draft-model-path", _SPEC),
        F(REFUSE, "--speculative-eagle-topk", _SPEC, int),
        F(REFUSE, "--speculative-num-draft-tokens", _SPEC, int),
        F(REFUSE, "--speculative-num-steps", _SPEC, int),
        F(REFUSE, "--speculative-token-map", _SPEC),
        F(WARN, "--stream-output", "OpenAI streams always carry deltas", SWITCH),
        F(WARN, "--triton-attention-num-kv-splits", _KERNEL, int, 8),
        F(WARN, "--triton-attention-reduce-in-fp32", _KERNEL, SWITCH),
        F(WARN, "--warmups", "buckets are compiled at start-up"),
        F(WARN, "--watchdog-timeout", "no step watchdog", float, 300.0),
        F(WARN, "--weight-loader-disable-mmap", "jaxserve memory-maps safetensors", SWITCH),
        F(WARN, "--worker-use-ray", "no Ray workers", SWITCH),
    )),
    ("Worker", "Registration with an iChat-style Gateway.", (
        F(WORKER, "--backend -be", "which dialect's defaults apply (host, port, metrics)",
          default="vllm", choices=("vllm", "sglang")),
        F(REFUSE, "--gateway-address -ga", "registering with a Gateway (a later issue)"),
        F(WORKER, "--heartbeat-interval --hi", "seconds between Gateway heartbeats", float,
          30.0),
        F(WORKER, "--log-streaming --ls", "stream logs to the Gateway", SWITCH, True),
    )),
)

FLAGS: tuple[Flag, ...] = tuple(f for _, _, flags in GROUPS for f in flags)
_BY_KEY = {f.key: f for f in FLAGS if f.kind != ALIAS}

_DIALECT_DEFAULTS = {"vllm": {"host": None, "port": 8000},
                     "sglang": {"host": "127.0.0.1", "port": 30000}}
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "trace")
_DEVICES = {"auto": None, "cpu": "cpu", "cuda": "cuda", "gpu": "cuda", "tpu": "tpu"}
# vLLM CompilationConfig keys that choose CUDA graphs, Inductor passes or custom ops.
_CC_IGNORED = frozenset(
    "debug_dump_path compile_cache_save_format backend custom_ops ir_enable_torch_wrap "
    "splitting_ops compile_mm_encoder cudagraph_mm_encoder encoder_cudagraph_token_budgets "
    "encoder_cudagraph_max_images_per_batch compile_sizes compile_ranges_endpoints "
    "inductor_compile_config inductor_passes cudagraph_mode cudagraph_num_of_warmups "
    "cudagraph_copy_inputs cudagraph_specialize_lora use_inductor_graph_partition pass_config "
    "dynamic_shapes_config local_cache_dir fast_moe_cold_start static_all_moe_layers "
    "use_inductor use_cudagraph full_cuda_graph max_capture_size".split())


def _help(flag: Flag) -> str:
    text = {WARN: "ignored on JAX: ", REFUSE: "not implemented in jaxserve yet: ",
            MAPPED: "mapped: "}.get(flag.kind, "") + flag.note
    if flag.type is not SWITCH and flag.default not in (None, argparse.SUPPRESS, "", []):
        text += f" (default: {flag.default})"
    return text.replace("%", "%%")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Register every `jaxserve serve` flag on `parser`, grouped as `vllm serve --help` groups."""
    parser.add_argument("model_tag", nargs="?", metavar="MODEL",
                        help="the model (same as --model)")
    parser.add_argument("--config", help="YAML file whose keys are flags; the command line wins")
    for title, description, flags in GROUPS:
        group = parser.add_argument_group(title, description)
        for flag in flags:
            kw: dict[str, Any] = {"help": _help(flag), "default": flag.default}
            if flag.dest:
                kw["dest"] = flag.dest
            if flag.action == "store_const":
                kw.update(action="store_const", const=flag.const)
            elif flag.type is SWITCH:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = flag.type
                for name in ("nargs", "choices", "action", "const"):
                    if getattr(flag, name) is not None:
                        kw[name] = getattr(flag, name)
            group.add_argument(*flag.names, **kw)


@functools.lru_cache(maxsize=1)
def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxserve serve", usage="%(prog)s [MODEL] [options]", allow_abbrev=False,
        description="Serve a model over the OpenAI API; takes `vllm serve` flags and SGLang's "
                    "spellings of them.")
    add_serve_args(parser)
    return parser


# ----------------------------------------------------------------------------- argv rewrites
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return parser._option_string_actions  # argparse has no public lookup by option string


def _expand_config(argv: list[str], parser: argparse.ArgumentParser
                   ) -> tuple[list[str], str | None]:
    """`--config FILE.yaml` -> (its keys as flags placed before `argv`, its model if any).

    The file's model is returned apart: it only applies when the command line names none.
    """
    path = None
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif tok.startswith("--config="):
            path = tok.partition("=")[2]
    if path is None:
        return argv, None
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    actions, tokens, model = _actions(parser), [], None
    for key, value in config.items():
        opt = "--" + str(key).replace("_", "-")
        if opt not in actions:
            raise ValueError(f"--config {path}: unknown key {key!r}")
        if actions[opt].dest == "model":
            model = str(value)
            continue
        tokens += _config_tokens(opt, value, actions[opt], actions)
    return tokens + argv, model


def _config_tokens(opt: str, value: Any, action: argparse.Action,
                   actions: dict[str, argparse.Action]) -> list[str]:
    if action.nargs == 0:  # a switch
        negative = "--no-" + opt[2:]
        return [opt] if value else [negative] if negative in actions else []
    if isinstance(value, dict) or (isinstance(value, list) and action.type is json_list):
        return [opt, json.dumps(value)]
    if isinstance(value, list):
        if isinstance(action, argparse._AppendAction):
            return [t for v in value for t in (opt, str(v))]
        return [opt, *map(str, value)]
    return [opt, str(value)]


def _normalise_switches(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--flag=true`, `--flag false` (older vLLM) become `--flag` / `--no-flag`."""
    actions, out, i = _actions(parser), [], 0
    while i < len(argv):
        tok = argv[i]
        head, eq, value = tok.partition("=")
        action = actions.get(head) if tok.startswith("-") else None
        if action is None or action.nargs != 0:
            out.append(tok)
            i += 1
            continue
        if not eq and i + 1 < len(argv) and argv[i + 1].lower() in _TRUE + _FALSE:
            eq, value = "=", argv[i + 1]
            i += 1
        i += 1
        if not eq:
            out.append(tok)
        elif value.lower() in _TRUE:
            out.append(head)
        elif value.lower() in _FALSE:
            negative = "--no-" + head.lstrip("-")
            out += [negative] if negative in actions else []
        else:
            raise ValueError(f"{head} takes no value or true/false, got {value!r}")
    return out


def _parse_leaf(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(obj: dict[str, Any], path: str, text: str, name: str) -> None:
    """`a.b 3` sets obj["a"]["b"] = 3; `a.b+ 1,2` appends 1 and 2 to the list obj["a"]["b"]."""
    *parents, last = path.split(".")
    for key in parents:
        obj = obj.setdefault(key, {})
        if not isinstance(obj, dict):
            raise ValueError(f"{name}.{path}: {key!r} is not an object")
    if last.endswith("+"):
        items = obj.setdefault(last[:-1], [])
        if not isinstance(items, list):
            raise ValueError(f"{name}.{path}: {last[:-1]!r} is not a list")
        items.extend(_parse_leaf(t) for t in text.split(","))
    else:
        obj[last] = _parse_leaf(text)


def _match_json_flag(tok: str, flags: dict[str, argparse.Action]
                     ) -> tuple[str, str | None, str | None] | None:
    """(option string, dotted path or None, inline value or None) when `tok` sets a JSON flag."""
    head, eq, inline = tok.partition("=")
    for s in flags:
        if head == s:
            return s, None, inline if eq else None
        if head.startswith(s + "."):
            return s, head[len(s) + 1:], inline if eq else None
        if len(s) == 2 and tok.startswith(s) and tok[2] not in ".=":
            return s, None, tok[2:]  # -O3
    return None


def _fold_json_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Bare JSON, dotted keys, `+` appends and `-O3` of each JSON flag -> one JSON object,
    merged in order and placed where the flag first appeared."""
    flags = {s: a for s, a in _actions(parser).items()
             if a.type in (json_object, compilation_json, mm_limits)}
    merged: dict[str, dict[str, Any]] = {}
    where: dict[str, int] = {}  # canonical spelling -> index of its value in `out`
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out += argv[i:]
            break
        hit = _match_json_flag(tok, flags) if tok.startswith("-") else None
        i += 1
        if hit is None:
            out.append(tok)
            continue
        s, path, value = hit
        name = tok.partition("=")[0]
        if value is None:
            if i >= len(argv):
                raise ValueError(f"{name} needs a value")
            value, i = argv[i], i + 1
        action = flags[s]
        canonical = action.option_strings[0]
        if canonical not in merged:  # keep the first spelling typed, for messages
            merged[canonical], where[canonical] = {}, len(out) + 1
            out += [s, ""]  # the value is filled in below
        if path is None:
            try:
                merged[canonical] = _merge(merged[canonical], action.type(value))
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{name}: {e}") from None
        else:
            _set_path(merged[canonical], path, value, s)
    for canonical, k in where.items():
        out[k] = json.dumps(merged[canonical])
    return out


def _typed(argv: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the spelling the user typed (the last one, as argparse keeps the last value)."""
    actions, typed = _actions(parser), {}
    for tok in argv:
        if tok == "--":
            break
        head = tok.partition("=")[0]
        if tok.startswith("-") and head in actions:
            typed[actions[head].dest] = head
    return typed


# ----------------------------------------------------------------------------- parse
def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """Parse `jaxserve serve` arguments (without "serve") into a namespace with `engine_args`.

    Applies `--config`, dotted JSON keys, the dialect's defaults (`--backend`), SGLang spellings,
    warnings and refusals. Raises `ValueError` naming the flag for anything refused. Does not
    initialise a JAX backend (`--device` only sets JAX_PLATFORMS).
    """
    parser = _serve_parser()
    argv, config_model = _expand_config(list(argv), parser)
    argv = _normalise_switches(argv, parser)
    argv = _fold_json_flags(argv, parser)
    typed = _typed(argv, parser)
    ns = parser.parse_args(argv)
    _resolve_model(ns, typed, config_model)
    _refuse(ns, typed)
    _apply_frontend(ns, typed)
    engine_kwargs = _engine_kwargs(ns, typed)
    _warn(ns, typed)
    _apply_environment(ns)
    ns.engine_args = _build_engine_args(ns, engine_kwargs, typed)
    return ns


def _name(key: str, typed: dict[str, str]) -> str:
    """The flag as the user typed it, else its canonical spelling."""
    return typed.get(key) or _BY_KEY[key].names[0]


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _resolve_model(ns: argparse.Namespace, typed: dict[str, str], config_model: str | None
                   ) -> None:
    if ns.model_tag is not None and ns.model is not None and ns.model_tag != ns.model:
        raise ValueError(f"the positional model {ns.model_tag!r} and {_name('model', typed)} "
                         f"{ns.model!r} differ; give one")
    ns.model = ns.model_tag or ns.model or config_model


def _refuse(ns: argparse.Namespace, typed: dict[str, str]) -> None:
    problems = []
    for flag in FLAGS:
        value = getattr(ns, flag.key)
        if flag.kind == REFUSE and not flag.is_neutral(value):
            name = _name(flag.key, typed)
            shown = name if isinstance(value, bool) else f"{name} {_show(value)}"
            problems.append(f"{shown} is not implemented in jaxserve yet ({flag.note})")
    if ns.schedule_policy != "fcfs":
        problems.append(f"{_name('schedule_policy', typed)} {ns.schedule_policy} is not "
                        "implemented in jaxserve yet (fcfs is; for priorities use "
                        "--scheduling-policy priority)")
    if ns.device not in _DEVICES:
        problems.append(f"{_name('device', typed)} {ns.device} is not supported by jaxserve "
                        f"(use one of {', '.join(_DEVICES)})")
    if problems:
        raise ValueError("; ".join(problems))


def _warn(ns: argparse.Namespace, typed: dict[str, str]) -> None:
    for flag in FLAGS:
        if flag.kind == WARN and not flag.is_neutral(getattr(ns, flag.key)):
            logger.warning("%s is ignored on JAX: %s", _name(flag.key, typed), flag.note)


def _apply_frontend(ns: argparse.Namespace, typed: dict[str, str]) -> None:
    """The dialect's defaults and the SGLang spellings of frontend options."""
    for key, value in _DIALECT_DEFAULTS[ns.backend].items():
        if key not in typed:
            setattr(ns, key, value)
    ns.enable_metrics = ns.backend == "vllm" or bool(ns.enable_metrics)
    for key in ("log_level", "log_level_http"):
        level = getattr(ns, key)
        if level is not None and level.lower() not in _LOG_LEVELS:
            raise ValueError(f"{_name(key, typed)} must be one of {', '.join(_LOG_LEVELS)}, "
                             f"got {level!r}")
    if ns.log_level_http is not None:
        ns.uvicorn_log_level = ns.log_level_http.lower()
    ns.enable_prompt_tokens_details = ns.enable_prompt_tokens_details or ns.enable_cache_report


def _apply_environment(ns: argparse.Namespace) -> None:
    """`--device` and `--hf-token` set the environment of JAX and the hub before either starts."""
    platform = _DEVICES[ns.device]
    if platform is not None:
        os.environ["JAX_PLATFORMS"] = platform
        if "jax" in sys.modules:  # imported, not yet initialised: its config read the env already
            sys.modules["jax"].config.update("jax_platforms", platform)
    if isinstance(ns.hf_token, str):
        os.environ["HF_TOKEN"] = ns.hf_token


def _powers_of_two_to(cap: int, name: str) -> tuple[int, ...]:
    if not isinstance(cap, int) or cap < 1:
        raise ValueError(f"{name} must be a positive integer, got {cap!r}")
    return tuple(sorted({1 << k for k in range(cap.bit_length())} | {cap}))


def _compilation(ns: argparse.Namespace, typed: dict[str, str]
                 ) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], str | None]:
    """`--compilation-config` -> (size lists, caps, cache dir); lists and caps hold
    (where it came from, value)."""
    name = _name("compilation_config", typed)
    lists, caps, cache_dir, ignored = [], [], None, []
    for key, value in (ns.compilation_config or {}).items():
        if key in ("level", "mode"):
            logger.info("%s %s=%s: XLA always compiles the whole step, whatever the level",
                        name, key, value)
        elif key == "cudagraph_capture_sizes":
            lists.append((f"{name} cudagraph_capture_sizes", value))
        elif key == "max_cudagraph_capture_size":
            caps.append((f"{name} max_cudagraph_capture_size", value))
        elif key == "cache_dir":
            cache_dir = value or None
        elif key in _CC_IGNORED:
            ignored.append(key)
        else:
            raise ValueError(f"{name}: unknown key {key!r}")
    if ignored:
        logger.warning("%s %s: ignored on JAX (CUDA graph, Inductor and custom-op settings)",
                       name, ", ".join(ignored))
    return lists, caps, cache_dir


def _compile_sizes(ns: argparse.Namespace, typed: dict[str, str], lists: list, caps: list
                   ) -> tuple[int, ...] | None:
    """Every spelling of CUDA-graph sizes -> compiled token buckets. A list of sizes is used as
    given (capped by any maximum); a maximum alone means powers of two up to it."""
    for key in ("cudagraph_capture_sizes", "cuda_graph_bs"):
        if getattr(ns, key):
            lists.append((_name(key, typed), getattr(ns, key)))
    for key in ("max_cudagraph_capture_size", "cuda_graph_max_bs"):
        if getattr(ns, key) is not None:
            caps.append((_name(key, typed), getattr(ns, key)))
    if ns.cuda_graph_sizes:  # vLLM: several values are the sizes, one value the maximum
        name = _name("cuda_graph_sizes", typed)
        if len(ns.cuda_graph_sizes) > 1:
            lists.append((name, ns.cuda_graph_sizes))
        else:
            caps.append((name, ns.cuda_graph_sizes[0]))
    for given in (lists, caps):
        if len({_show(v) for _, v in given}) > 1:
            raise ValueError("conflicting compile sizes: " + ", ".join(
                f"{n} {_show(v)}" for n, v in given))
    if lists:
        name, sizes = lists[0]
        if not isinstance(sizes, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ValueError(f"{name} must be positive token counts, got {_show(sizes)}")
        if caps:
            sizes = [s for s in sizes if s <= caps[0][1]] or sizes
        return tuple(sorted(set(sizes)))
    if caps:
        return _powers_of_two_to(caps[0][1], caps[0][0])
    return None


def _engine_kwargs(ns: argparse.Namespace, typed: dict[str, str]) -> dict[str, Any]:
    """The EngineArgs fields, with every mapped spelling folded in."""
    kw = {f.key: getattr(ns, f.key) for f in FLAGS if f.kind == ENGINE}
    kw["model"] = ns.model
    kw["chat_template"] = ns.chat_template
    kw["served_model_name"] = ns.served_model_name[0] if ns.served_model_name else None
    if kw["max_model_len"] is not None and kw["max_model_len"] < 0:
        kw["max_model_len"] = None  # -1/auto: the model's own length
    if kw["max_logprobs"] < 0:
        logger.warning("%s %d (no cap) is capped at %d: the compiled sampler returns at most "
                       "that many", _name("max_logprobs", typed), kw["max_logprobs"],
                       MAX_LOGPROBS)
        kw["max_logprobs"] = MAX_LOGPROBS
    overrides = _merge(ns.hf_overrides or {}, ns.json_model_override_args or {})
    if ns.rope_scaling:
        overrides["rope_scaling"] = ns.rope_scaling
    if ns.rope_theta is not None:
        overrides["rope_theta"] = ns.rope_theta
    kw["hf_overrides"] = overrides or None
    kw["override_generation_config"] = ns.override_generation_config or None
    lists, caps, kw["compilation_cache_dir"] = _compilation(ns, typed)
    kw["compile_sizes"] = _compile_sizes(ns, typed, lists, caps)
    kw["enforce_eager"] = ns.enforce_eager or ns.disable_cuda_graph
    if ns.disable_radix_cache:
        kw["enable_prefix_caching"] = False
    if ns.ep_size > 1 or ns.enable_ep_moe:
        kw["enable_expert_parallel"] = True
    if ns.chunked_prefill_size is not None:
        if ns.chunked_prefill_size < 0:
            kw["enable_chunked_prefill"] = False
        else:
            kw["max_num_batched_tokens"] = ns.chunked_prefill_size
    return kw


def _build_engine_args(ns: argparse.Namespace, kw: dict[str, Any], typed: dict[str, str]):
    from jaxserve.engine.args import EngineArgs  # after _apply_environment: it imports jax

    args = EngineArgs(**kw)
    if ns.max_total_tokens is not None:  # SGLang's KV pool size in tokens -> pages
        name = _name("max_total_tokens", typed)
        if args.num_gpu_blocks_override is not None:
            raise ValueError(f"give {name} or {_name('num_gpu_blocks_override', typed)}, "
                             "not both")
        if ns.max_total_tokens < 1:
            raise ValueError(f"{name} must be positive, got {ns.max_total_tokens}")
        pages = math.ceil(ns.max_total_tokens / args.cache_config().block_size)
        args = args.replace(num_gpu_blocks_override=pages)
    return args
