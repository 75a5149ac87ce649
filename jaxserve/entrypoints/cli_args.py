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
import sys
from typing import Any
from urllib.parse import urlsplit

from jaxserve.entrypoints.serve_flags import (BY_KEY, ENGINE, FLAGS, GRAMMAR_BACKENDS, GROUPS,
                                              MAPPED, REFUSE, SWITCH, WARN, Flag,
                                              compilation_json, json_list, json_object,
                                              mm_limits)
from jaxserve.entrypoints.serve_help import HelpAction
from jaxserve.sampling_params import MAX_LOGPROBS

logger = logging.getLogger("jaxserve.cli")

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
        add_flag_group(parser, title, description, flags)


def add_flag_group(parser: argparse.ArgumentParser, title: str, description: str,
                   flags: tuple[Flag, ...]) -> None:
    """Register `flags` on `parser` as one help group."""
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
        add_help=False, description="Serve a model over the OpenAI API; takes `vllm serve` "
                                    "flags and SGLang's spellings of them.")
    parser.add_argument("-h", "--help", action=HelpAction,
                        help="a short help; --help=all: every flag; --help=GROUP (e.g. "
                             "CacheConfig): one group; --help=FLAG (e.g. max-num-seqs): one flag")
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
    _apply_worker(ns, typed)
    _apply_parsers(ns, typed)
    engine_kwargs = _engine_kwargs(ns, typed)
    _warn(ns, typed)
    _apply_environment(ns)
    _note_memory_on_cpu(ns, typed)
    ns.engine_args = _build_engine_args(ns, engine_kwargs, typed)
    return ns


def _name(key: str, typed: dict[str, str]) -> str:
    """The flag as the user typed it, else its canonical spelling."""
    return typed.get(key) or BY_KEY[key].names[0]


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


# SGLang's parser names -> jaxserve's (vLLM's), for names jaxserve has no parser under.
_SGLANG_PARSERS = {"tool_call_parser": {"qwen25": "hermes", "qwen": "hermes", "llama3":
                                        "llama3_json", "qwen3": "hermes"},
                   "reasoning_parser": {"deepseek-r1": "deepseek_r1"}}


def _apply_parsers(ns: argparse.Namespace, typed: dict[str, str]) -> None:
    """Load the parser plugins, then check the parser names against the registries (SGLang's
    names mapped), and `--enable-auto-tool-choice` / `--enable-reasoning` against them."""
    from jaxserve.entrypoints.openai.tool_parsers import ToolParserManager
    from jaxserve.reasoning import ReasoningParserManager

    for key, plugin_key, manager in (
            ("tool_call_parser", "tool_parser_plugin", ToolParserManager),
            ("reasoning_parser", "reasoning_parser_plugin", ReasoningParserManager)):
        path = getattr(ns, plugin_key)
        if path:
            try:
                manager.load_plugin(path)
            except ValueError as e:
                raise ValueError(f"{_name(plugin_key, typed)} {path}: {e}") from None
        name = getattr(ns, key)
        if not name:
            setattr(ns, key, None)
            continue
        if name not in manager.names():
            name = _SGLANG_PARSERS[key].get(name, name)
        if name not in manager.names():
            raise ValueError(f"{_name(key, typed)} {getattr(ns, key)}: no such "
                             f"{manager.kind}; valid names: {', '.join(manager.names())}")
        setattr(ns, key, name)
    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        raise ValueError(f"{_name('enable_auto_tool_choice', typed)} needs --tool-call-parser "
                         "(how tool calls are read from the output)")
    if ns.enable_reasoning:
        if not ns.reasoning_parser:
            raise ValueError(f"{_name('enable_reasoning', typed)} needs --reasoning-parser")
        logger.warning("%s is deprecated: --reasoning-parser alone enables reasoning",
                       _name("enable_reasoning", typed))


def _structured_outputs_config(ns: argparse.Namespace, typed: dict[str, str]
                               ) -> dict[str, Any] | None:
    """`--structured-outputs-config` with the older `--guided-decoding-*` flags, SGLang's
    `--grammar-backend` and `--reasoning-parser` folded in; a flag that contradicts the JSON,
    or asks for what jaxserve lacks, raises naming the flag."""
    cfg = dict(ns.structured_outputs_config or {})
    given: list[tuple[str, str, Any]] = []  # (flag key, config key, value)
    if ns.guided_decoding_backend != "auto" or "guided_decoding_backend" in typed:
        if ns.guided_decoding_backend not in GRAMMAR_BACKENDS:
            raise ValueError(f"{_name('guided_decoding_backend', typed)} "
                             f"{ns.guided_decoding_backend} is not available: jaxserve's "
                             f"structured outputs run on llguidance (use one of "
                             f"{', '.join(GRAMMAR_BACKENDS)})")
        given.append(("guided_decoding_backend", "backend", ns.guided_decoding_backend))
    if ns.grammar_backend is not None:
        if ns.grammar_backend != "llguidance":
            raise ValueError(f"{_name('grammar_backend', typed)} {ns.grammar_backend} is not "
                             "available: jaxserve's structured outputs run on llguidance")
        given.append(("grammar_backend", "backend", "llguidance"))
    for key, cfg_key in (("guided_decoding_disable_fallback", "disable_fallback"),
                         ("guided_decoding_disable_any_whitespace", "disable_any_whitespace"),
                         ("guided_decoding_disable_additional_properties",
                          "disable_additional_properties")):
        if getattr(ns, key):
            given.append((key, cfg_key, True))
    if ns.reasoning_parser:
        given.append(("reasoning_parser", "reasoning_parser", ns.reasoning_parser))
    for key, cfg_key, value in given:
        if cfg_key in cfg and cfg[cfg_key] != value:
            raise ValueError(f"{_name(key, typed)} {_show(value)} contradicts "
                             f"{_name('structured_outputs_config', typed)} {cfg_key}="
                             f"{_show(cfg[cfg_key])}")
        cfg[cfg_key] = value
    return cfg or None


def _apply_worker(ns: argparse.Namespace, typed: dict[str, str]) -> None:
    """The Gateway flags: URLs that can be reached, a positive interval, the token's env."""
    for key in ("gateway_address", "worker_url"):
        url = getattr(ns, key)
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{_name(key, typed)} must be an http:// or https:// URL, "
                                 f"got {url!r}")
    if not (0 < ns.heartbeat_interval < math.inf):
        raise ValueError(f"{_name('heartbeat_interval', typed)} must be a positive number of "
                         f"seconds, got {ns.heartbeat_interval}")
    if ns.gateway_token is None:
        ns.gateway_token = os.environ.get("JAXSERVE_GATEWAY_TOKEN") or None


def _apply_environment(ns: argparse.Namespace) -> None:
    """`--device` and `--hf-token` set the environment of JAX and the hub before either starts."""
    platform = _DEVICES[ns.device]
    if platform is not None:
        os.environ["JAX_PLATFORMS"] = platform
        if "jax" in sys.modules:  # imported, not yet initialised: its config read the env already
            sys.modules["jax"].config.update("jax_platforms", platform)
    if isinstance(ns.hf_token, str):
        os.environ["HF_TOKEN"] = ns.hf_token


def _note_memory_on_cpu(ns: argparse.Namespace, typed: dict[str, str]) -> None:
    """On CPU, say in one line what `--gpu-memory-utilization` means there."""
    from jaxserve.logs import platform_guess

    if "gpu_memory_utilization" in typed and platform_guess() == "cpu":
        logger.warning("%s %s on CPU: a fraction of host RAM for the weights and the KV cache, "
                       "and the KV cache is capped further on CPU (the memory plan logged at "
                       "start-up says how); --kv-cache-memory-bytes sets the KV cache's size",
                       _name("gpu_memory_utilization", typed), ns.gpu_memory_utilization)


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
    kw["structured_outputs_config"] = _structured_outputs_config(ns, typed)
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
    if ns.dist_init_addr is not None:
        kw["master_addr"], kw["master_port"] = _dist_init_addr(ns, typed)
    return kw


def _dist_init_addr(ns: argparse.Namespace, typed: dict[str, str]) -> tuple[str, int]:
    """SGLang's `--dist-init-addr HOST:PORT` (an IPv6 host in brackets) -> master addr, port."""
    name = _name("dist_init_addr", typed)
    host, sep, port = ns.dist_init_addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{name} must be HOST:PORT, got {ns.dist_init_addr!r}")
    for key, value in (("master_addr", host), ("master_port", int(port))):
        if key in typed and getattr(ns, key) != value:
            raise ValueError(f"{name} {ns.dist_init_addr} contradicts {_name(key, typed)} "
                             f"{getattr(ns, key)}")
    return host, int(port)


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
        from jaxserve.kernels_pallas import default_backend

        # The page size the engine will use: --block-size, else the attention backend's own.
        backend = args.attention_backend or default_backend()
        pages = math.ceil(ns.max_total_tokens / args.cache_config(backend).block_size)
        args = args.replace(num_gpu_blocks_override=pages)
    return args
