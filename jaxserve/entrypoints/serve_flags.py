"""The `jaxserve serve` flag table: every `vllm serve` flag and SGLang spelling, in vLLM's help
groups, with what jaxserve does with it (see `cli_args` for how the table is applied)."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
_SO_CFG = "-> --structured-outputs-config"
# Structured-output backends a flag or request may name: all of them are llguidance here.
GRAMMAR_BACKENDS = ("auto", "guidance", "llguidance")
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
        F(FRONTEND, "--trust-request-chat-template", "accept chat_template in requests (else "
          "refused with a 400); renders are stopped after 5 s either way", SWITCH),
        F(FRONTEND, "--max-request-body-bytes", "larger request bodies are refused with a 413 "
          "(1k, 32M, ...; 0: no limit)", human_int, 32 * 1024 * 1024),
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
        F(FRONTEND, "--enable-auto-tool-choice", 'tool_choice "auto": the model may call '
          "tools, read by --tool-call-parser", SWITCH),
        F(FRONTEND, "--tool-call-parser", "how tool calls are read from the output with "
          'tool_choice "auto": hermes, llama3_json, mistral, pythonic, qwen3_xml, qwen3_coder '
          "or a plugin's (SGLang's names qwen25, llama3, deepseek-r1 ... map onto these)"),
        F(FRONTEND, "--tool-parser-plugin", "Python file registering more tool parsers",
          default=""),
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
        F(FRONTEND, "--reasoning-parser", "splits chat outputs into reasoning_content and "
          "content: deepseek_r1, qwen3, granite or a plugin's", default=""),
        F(FRONTEND, "--reasoning-parser-plugin", "Python file registering more reasoning "
          "parsers", default=""),
        F(MAPPED, "--enable-reasoning", "deprecated: --reasoning-parser alone enables reasoning",
          SWITCH),
        F(MAPPED, "--guided-decoding-backend", _SO_CFG + " backend (auto, guidance, llguidance: "
          "all llguidance)", default="auto"),
        F(MAPPED, "--guided-decoding-disable-fallback", _SO_CFG + " disable_fallback", SWITCH),
        F(MAPPED, "--guided-decoding-disable-any-whitespace", _SO_CFG + " disable_any_whitespace",
          SWITCH),
        F(MAPPED, "--guided-decoding-disable-additional-properties",
          _SO_CFG + " disable_additional_properties", SWITCH),
    )),
    ("ParallelConfig", "Distributed execution.", (
        F(WARN, "--distributed-executor-backend", _ONE_PROC),
        F(ENGINE, "--pipeline-parallel-size -pp", "pipeline stages: layers split over devices", int, 1),
        F(ENGINE, "--tensor-parallel-size -tp", "tensor-parallel devices: heads, MLP, vocabulary split", int, 1),
        F(ENGINE, "--data-parallel-size -dp", "data-parallel replicas, in one process", int, 1),
        F(ENGINE, "--enable-expert-parallel -ep", "MoE: whole experts per tensor-parallel device", SWITCH),
        F(ENGINE, "--master-addr", "multi-host: node 0's address, where the other nodes join "
          "the group (jax.distributed's coordinator)", default="127.0.0.1"),
        F(ENGINE, "--master-port", "multi-host: the coordinator's port on node 0", int, 29501),
        F(ENGINE, "--nnodes -n", "multi-host: nodes (one process each) whose devices form one "
          "mesh; set -tp to all their devices", int, 1),
        F(ENGINE, "--node-rank -r", "multi-host: this node; 0 serves HTTP and schedules, the "
          "others run its steps (no HTTP) and exit when it does", int, 0),
        F(ENGINE, "--distributed-timeout-seconds", "multi-host: seconds nodes wait for each "
          "other at start-up (default: 300)", int),
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
        F(ENGINE, "--kv-cache-dtype", "auto (the model's), float32, bfloat16, float16, or "
          "quantised: int8, fp8 (= fp8_e4m3), fp8_e5m2", default="auto"),
        F(ENGINE, "--num-gpu-blocks-override", "number of KV pages", int),
        F(ENGINE, "--enable-prefix-caching", "reuse KV pages of shared prefixes", SWITCH, True),
        F(ENGINE, "--prefix-caching-hash-algo", "hash of page contents", default="sha256"),
        F(WARN, "--swap-space", "preemption recomputes; nothing is swapped", float, 4.0),
        F(WARN, "--calculate-kv-scales", "int8/fp8 KV caches always compute a scale per token "
          "and head as they write", SWITCH),
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
        F(REFUSE, "--reasoning-config", "thinking budgets and reasoning markers for "
          "constrained decoding", json_object),
        F(WARN, "--additional-config", "platform plugin options", json_object),
        F(ENGINE, "--structured-outputs-config", "backend (auto, guidance, llguidance), "
          "disable_any_whitespace, disable_fallback, reasoning_parser (JSON)", json_object),
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
        F(MAPPED, "--grammar-backend", "llguidance " + _SO_CFG + " backend (xgrammar, outlines: "
          "not available)"),
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
        F(REFUSE, "--constrained-json-whitespace-pattern", "custom JSON whitespace patterns"),
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
        F(MAPPED, "--dist-init-addr --nccl-init-addr", "HOST:PORT of node 0 -> --master-addr, "
          "--master-port"),
        F(ALIAS, "--dist-timeout", "SGLang spelling of --distributed-timeout-seconds", int,
          dest="distributed_timeout_seconds", default=argparse.SUPPRESS),
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
    ("Worker", "Registration with a `jaxserve gateway` (docs/gateway.md).", (
        F(WORKER, "--backend -be", "which dialect's defaults apply (host, port, metrics); "
          "reported to the Gateway", default="vllm", choices=("vllm", "sglang")),
        F(WORKER, "--gateway-address -ga", "the Gateway's base URL to register with (none: no "
          "registration)"),
        F(WORKER, "--heartbeat-interval --hi", "seconds between Gateway heartbeats", float,
          30.0),
        F(WORKER, "--log-streaming --ls", "stream logs to the Gateway", SWITCH, True),
        F(WORKER, "--gateway-token", "the token the Gateway asks workers for (also env "
          "JAXSERVE_GATEWAY_TOKEN)"),
        F(WORKER, "--worker-url", "the address the Gateway routes to (default: http://<this "
          "machine's hostname>:<port> on all interfaces, else http://<host>:<port>)"),
    )),
)

FLAGS: tuple[Flag, ...] = tuple(f for _, _, flags in GROUPS for f in flags)
BY_KEY = {f.key: f for f in FLAGS if f.kind != ALIAS}
