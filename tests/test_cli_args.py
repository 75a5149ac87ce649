"""`jaxserve serve` arguments: every vLLM and SGLang flag parses; refusals, warnings and the
mappings onto `EngineArgs` behave as the help says. Pure parsing: no model is loaded."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

from jaxserve import cli
from jaxserve.entrypoints import cli_args, serve_flags
from jaxserve.entrypoints.cli_args import parse_serve_args
from jaxserve.entrypoints.serve_flags import FLAGS, REFUSE, SWITCH, WARN, Flag

SHARED = Path(__file__).parents[1].parent / "shared"
FLAG_LISTS = ("vllm_serve_flags.txt", "sglang_and_worker_flags.txt")


@pytest.fixture(autouse=True)
def _keep_environment():
    """--device and --hf-token write the environment; put it back after each test."""
    saved = {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "HF_TOKEN")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# A copy of the lists as of this writing, for machines (CI) without ../shared.
SNAPSHOT = Path(__file__).parent / "data"


def _listed_flags() -> list[str]:
    """The flag lists: ../shared's when present (they are the reference), else the snapshot."""
    folder = SHARED if SHARED.is_dir() else SNAPSHOT
    if not all((folder / name).is_file() for name in FLAG_LISTS):
        pytest.skip(f"neither {SHARED} nor {SNAPSHOT} holds the flag lists")
    return [line.strip() for name in FLAG_LISTS
            for line in (folder / name).read_text().splitlines() if line.strip()]


def _plausible(action) -> list[str]:
    """A value a user could give this flag: its default where it has one, else a sample."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [action.choices[0]]
    default = action.default
    if action.type in (serve_flags.json_object, serve_flags.compilation_json, serve_flags.mm_limits):
        return ["{}"]
    if action.type is serve_flags.json_list:
        return ['["*"]']
    if action.type in (int, serve_flags.human_int):
        return [str(default) if isinstance(default, int) else "1"]
    if action.type is float:
        return [str(default) if isinstance(default, (int, float)) else "0.5"]
    return [default if isinstance(default, str) and default else "x"]


def test_every_listed_flag_parses():
    actions = cli_args._serve_parser()._option_string_actions
    failures = []
    for flag in _listed_flags():
        assert flag in actions, f"{flag} is not registered"
        argv = [flag, *_plausible(actions[flag])]
        try:
            parse_serve_args(argv)
        except ValueError as e:  # a refusal names the flag; EngineArgs refuses parallelism
            if flag not in str(e) and "parallelism is not implemented yet" not in str(e):
                failures.append(f"{argv}: {e}")
        except SystemExit as e:
            failures.append(f"{argv}: argparse exit {e}")
    assert not failures, "\n".join(failures)


def test_unknown_flags_still_error(capsys):
    with pytest.raises(SystemExit):
        parse_serve_args(["--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def _non_default(flag: Flag) -> list[str]:
    """argv that sets `flag` to a value other than its default."""
    name = flag.names[0]
    if flag.type is SWITCH:
        return ["--no-" + name[2:]] if flag.is_neutral(True) else [name]
    if flag.type is serve_flags.mm_limits:
        value = '{"image": 1}'
    elif flag.type in (serve_flags.json_object, serve_flags.compilation_json):
        value = '{"x": 1}'
    elif flag.type in (int, float):
        value = str((flag.default or 0) + 3)
    else:
        value = "x"
    assert not flag.is_neutral(flag.type(value) if flag.nargs is None else [flag.type(value)])
    return [name, value]


def _default(flag: Flag) -> list[str]:
    """argv that sets `flag` explicitly to its default (--no-X for a switch that is off)."""
    if flag.type is SWITCH:
        if flag.default is None:
            return []
        return [flag.names[0]] if flag.default else ["--no-" + flag.names[0][2:]]
    if flag.default in (None, "") or isinstance(flag.default, list):
        return []
    return [flag.names[0], str(flag.default)]


@pytest.mark.parametrize("flag", [f for f in FLAGS if f.kind == REFUSE], ids=lambda f: f.names[0])
def test_refused_flags_raise_naming_the_flag(flag):
    argv = _non_default(flag)
    with pytest.raises(ValueError, match="not implemented in jaxserve yet") as e:
        parse_serve_args(argv)
    assert str(e.value).startswith(argv[0] + " ")
    parse_serve_args(_default(flag))  # the default (and --no-X) passes silently


def test_refusal_names_the_spelling_typed():
    with pytest.raises(ValueError, match=r"^-q awq is not implemented"):
        parse_serve_args(["-q", "awq"])
    with pytest.raises(ValueError, match=r"^-dpa 10.0.0.1 is not"):
        parse_serve_args(["-dpa", "10.0.0.1"])
    with pytest.raises(ValueError, match=r"-sc \{\"model\": \"d\"\}"):
        parse_serve_args(["-sc.model", "d"])
    with pytest.raises(ValueError) as e:  # every refusal at once, one per clause
        parse_serve_args(["--enable-lora", "--tokenizer-mode", "slow"])
    assert sorted(str(e.value).split("; ")) == [
        "--enable-lora is not implemented in jaxserve yet (LoRA adapters)",
        "--tokenizer-mode slow is not implemented in jaxserve yet (tokenizer modes other than "
        "auto and hf)"]


@pytest.mark.parametrize("argv", [["--tokenizer-mode", "hf"], ["--task", "generate"],
                                  ["--runner", "generate"], ["--api-server-count", "1"],
                                  ["--limit-mm-per-prompt", "image=0,video=0"],
                                  ["--guided-decoding-backend", "auto"],
                                  ["--preemption-mode", "recompute"], ["--quantization", "None"]])
def test_values_with_the_default_meaning_pass(argv):
    parse_serve_args(argv)


@pytest.mark.parametrize("flag", [f for f in FLAGS if f.kind == WARN], ids=lambda f: f.names[0])
def test_warned_flags_log_one_line(flag, caplog):
    caplog.set_level(logging.WARNING, logger="jaxserve.cli")
    parse_serve_args(_default(flag))
    assert not caplog.records
    argv = _non_default(flag)
    parse_serve_args(argv)
    warnings = [r for r in caplog.records if r.name == "jaxserve.cli"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage().startswith(f"{argv[0]} is ignored on JAX: ")


def test_frontend_namespace_and_defaults(monkeypatch):
    monkeypatch.delenv("JAXSERVE_GATEWAY_TOKEN", raising=False)
    ns = parse_serve_args([])
    expected = dict(
        host=None, port=8000, uvicorn_log_level="info", disable_uvicorn_access_log=False,
        allow_credentials=False, allowed_origins=["*"], allowed_methods=["*"],
        allowed_headers=["*"], api_key=None, root_path=None, ssl_keyfile=None,
        ssl_certfile=None, ssl_ca_certs=None, ssl_cert_reqs=0, enable_ssl_refresh=False,
        enable_request_id_headers=False, max_log_len=None, enable_log_requests=False,
        disable_fastapi_docs=False, served_model_name=None, chat_template=None,
        chat_template_content_format="auto", response_role="assistant",
        return_tokens_as_token_ids=False, middleware=[], enable_prompt_tokens_details=False,
        enable_force_include_usage=False, enable_server_load_tracking=False,
        disable_log_stats=False, shutdown_timeout=0, log_level="info", enable_metrics=True,
        max_logprobs=20, backend="vllm", gateway_address=None, heartbeat_interval=30.0,
        log_streaming=True, gateway_token=None, worker_url=None, model=None,
        log_config_file=None)
    assert {k: getattr(ns, k) for k in expected} == expected
    ns = parse_serve_args(["--served-model-name", "a", "b", "--allowed-origins",
                           '["http://x"]', "--middleware", "m.one", "--middleware", "m.two",
                           "--max-log-len", "10", "--api-key", "k", "--ssl-cert-reqs", "2"])
    assert ns.served_model_name == ["a", "b"] and ns.engine_args.served_model_name == "a"
    assert ns.allowed_origins == ["http://x"] and ns.middleware == ["m.one", "m.two"]
    assert (ns.max_log_len, ns.api_key, ns.ssl_cert_reqs) == (10, "k", 2)


def test_request_logging_spellings():
    assert parse_serve_args(["--enable-log-requests"]).enable_log_requests is True
    assert parse_serve_args(["--disable-log-requests"]).enable_log_requests is False
    assert parse_serve_args(["--log-requests"]).enable_log_requests is True


def test_dialect_defaults():
    sglang = parse_serve_args(["--backend", "sglang"])
    assert (sglang.host, sglang.port, sglang.enable_metrics) == ("127.0.0.1", 30000, False)
    sglang = parse_serve_args(["-be", "sglang", "--port", "1234", "--enable-metrics"])
    assert (sglang.host, sglang.port, sglang.enable_metrics) == ("127.0.0.1", 1234, True)
    vllm = parse_serve_args(["--host", "0.0.0.0", "--enable-metrics"])
    assert (vllm.host, vllm.port, vllm.enable_metrics) == ("0.0.0.0", 8000, True)


def test_gateway_flags(monkeypatch):
    monkeypatch.setenv("JAXSERVE_GATEWAY_TOKEN", "from-env")
    ns = parse_serve_args(["-ga", "http://gw:9000", "--hi", "5", "--no-ls",
                           "--worker-url", "http://w:8001", "-be", "sglang"])
    assert (ns.gateway_address, ns.heartbeat_interval, ns.log_streaming) == \
        ("http://gw:9000", 5.0, False)
    assert (ns.gateway_token, ns.worker_url, ns.backend) == ("from-env", "http://w:8001", "sglang")
    assert parse_serve_args(["--gateway-token", "t"]).gateway_token == "t"
    assert parse_serve_args(["--log-streaming", "--heartbeat-interval", "0.5"]).log_streaming
    with pytest.raises(ValueError, match="^-ga must be an http:// or https:// URL, got 'gw:9000'"):
        parse_serve_args(["-ga", "gw:9000"])
    with pytest.raises(ValueError, match="^--worker-url must be an http"):
        parse_serve_args(["--worker-url", "w"])
    with pytest.raises(ValueError, match="^--hi must be a positive number of seconds, got 0.0"):
        parse_serve_args(["--hi", "0"])


def test_sglang_spellings_map_onto_engine_args():
    ns = parse_serve_args([
        "--model-path", "m", "--tokenizer-path", "t", "--context-length", "2048",
        "--mem-fraction-static", "0.5", "--max-running-requests", "7", "--page-size", "32",
        "--random-seed", "3", "--chunked-prefill-size", "256", "--disable-radix-cache",
        "--json-model-override-args", '{"rope_theta": 5.0}', "--disable-cuda-graph",
        "--cuda-graph-max-bs", "8", "--enable-cache-report", "--log-level-http", "warning",
        "--log-level", "debug", "--schedule-policy", "fcfs"])
    e = ns.engine_args
    assert (e.model, e.tokenizer, e.max_model_len, e.gpu_memory_utilization) == \
        ("m", "t", 2048, 0.5)
    assert (e.max_num_seqs, e.block_size, e.seed, e.max_num_batched_tokens) == (7, 32, 3, 256)
    assert e.enable_prefix_caching is False and e.enforce_eager is True
    assert e.hf_overrides == {"rope_theta": 5.0} and e.compile_sizes == (1, 2, 4, 8)
    assert ns.enable_prompt_tokens_details and ns.uvicorn_log_level == "warning"
    assert ns.log_level == "debug" and e.scheduling_policy == "fcfs"
    assert parse_serve_args(["--chunked-prefill-size", "-1"]).engine_args \
        .enable_chunked_prefill is False


def test_sglang_parallel_spellings(monkeypatch):
    from jaxserve.engine.args import EngineArgs

    monkeypatch.setattr(EngineArgs, "__post_init__", lambda self: None)  # parallelism checks
    e = parse_serve_args(["--tp-size", "4", "--dp-size", "2", "--pp-size", "3",
                          "--ep-size", "2"]).engine_args
    assert (e.tensor_parallel_size, e.data_parallel_size, e.pipeline_parallel_size) == (4, 2, 3)
    assert e.enable_expert_parallel is True
    assert parse_serve_args(["--tp", "8"]).engine_args.tensor_parallel_size == 8
    assert parse_serve_args(["--enable-ep-moe"]).engine_args.enable_expert_parallel is True


def test_multi_host_flags_map_onto_engine_args():
    e = parse_serve_args(["-n", "2", "-r", "1", "--master-addr", "10.0.0.1", "--master-port",
                          "5000", "--distributed-timeout-seconds", "60", "-tp", "8"]).engine_args
    assert (e.nnodes, e.node_rank, e.master_addr, e.master_port) == (2, 1, "10.0.0.1", 5000)
    assert e.distributed_timeout_seconds == 60
    # SGLang: --dist-init-addr HOST:PORT (an IPv6 host in brackets), --dist-timeout.
    e = parse_serve_args(["--nnodes", "2", "--node-rank", "1", "--dist-init-addr",
                          "10.0.0.2:6000", "--dist-timeout", "30"]).engine_args
    assert (e.master_addr, e.master_port, e.distributed_timeout_seconds) == \
        ("10.0.0.2", 6000, 30)
    e = parse_serve_args(["--nccl-init-addr", "[::1]:6000"]).engine_args
    assert (e.master_addr, e.master_port) == ("::1", 6000)
    e = parse_serve_args(["--dist-init-addr", "h:1", "--master-addr", "h"]).engine_args
    assert (e.master_addr, e.master_port) == ("h", 1)
    with pytest.raises(ValueError, match=r"^--dist-init-addr must be HOST:PORT, got 'h'"):
        parse_serve_args(["--dist-init-addr", "h"])
    with pytest.raises(ValueError, match=r"^--dist-init-addr h:1 contradicts --master-port 2"):
        parse_serve_args(["--dist-init-addr", "h:1", "--master-port", "2"])
    with pytest.raises(ValueError, match=r"--node-rank must be in \[0, --nnodes 2\), got 2"):
        parse_serve_args(["-n", "2", "-r", "2"])
    with pytest.raises(ValueError, match="--nnodes > 1 with data or pipeline parallelism"):
        parse_serve_args(["-n", "2", "-dp", "2"])
    defaults = parse_serve_args([]).engine_args
    assert (defaults.nnodes, defaults.node_rank, defaults.master_addr, defaults.master_port) == \
        (1, 0, "127.0.0.1", 29501)


def test_engine_args_own_checks_propagate():
    assert parse_serve_args(["-pp", "2"]).engine_args.pipeline_parallel_size == 2
    with pytest.raises(ValueError, match="--tensor-parallel-size must be >= 1"):
        parse_serve_args(["-tp", "0"])
    with pytest.raises(ValueError, match="--kv-cache-dtype 'fp4'"):
        parse_serve_args(["--kv-cache-dtype", "fp4"])
    assert parse_serve_args(["--kv-cache-dtype", "fp8"]).engine_args.kv_cache_dtype == "fp8"


def test_schedule_policy_refuses_other_policies():
    with pytest.raises(ValueError, match="--schedule-policy lpm is not implemented"):
        parse_serve_args(["--schedule-policy", "lpm"])


def test_max_total_tokens_becomes_pages():
    assert parse_serve_args(["--max-total-tokens", "1000"]).engine_args \
        .num_gpu_blocks_override == 63  # ceil(1000 / 16)
    e = parse_serve_args(["--max-total-tokens", "1000", "--page-size", "32"]).engine_args
    assert e.num_gpu_blocks_override == 32
    with pytest.raises(ValueError, match="--max-total-tokens or --num-gpu-blocks-override"):
        parse_serve_args(["--max-total-tokens", "64", "--num-gpu-blocks-override", "4"])


def test_rope_flags_become_hf_overrides():
    e = parse_serve_args(["--hf-overrides", '{"a": 1}', "--rope-theta", "1e6", "--rope-scaling",
                          '{"rope_type": "dynamic", "factor": 2.0}']).engine_args
    assert e.hf_overrides == {"a": 1, "rope_theta": 1e6,
                              "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}


def test_dotted_keys_and_appends():
    e = parse_serve_args([
        "--hf-overrides.rope_theta", "1e6", "--hf-overrides.rope_scaling.factor", "2",
        "--hf-overrides.rope_scaling.rope_type", "dynamic", "--hf-overrides.model_type=llama",
        "--override-generation-config", '{"temperature": 0.5}',
        "--override-generation-config.top_k", "5",
        "--compilation-config.cudagraph_capture_sizes+", "8",
        "--compilation-config.cudagraph_capture_sizes+", "16",
        "-cc.cudagraph_capture_sizes+=32,64"]).engine_args
    assert e.hf_overrides == {"rope_theta": 1e6, "model_type": "llama",
                              "rope_scaling": {"factor": 2, "rope_type": "dynamic"}}
    assert e.override_generation_config == {"temperature": 0.5, "top_k": 5}
    assert e.compile_sizes == (8, 16, 32, 64)


def test_compilation_config(caplog):
    caplog.set_level(logging.INFO, logger="jaxserve.cli")
    parse = parse_serve_args
    assert parse(["--compilation-config", '{"cudagraph_capture_sizes": [4, 1, 2]}']) \
        .engine_args.compile_sizes == (1, 2, 4)
    e = parse(["-O", '{"max_cudagraph_capture_size": 20, "cache_dir": "/c"}']).engine_args
    assert e.compile_sizes == (1, 2, 4, 8, 16, 20) and e.compilation_cache_dir == "/c"
    assert parse(["-O3"]).engine_args.compile_sizes is None
    assert parse(["--compilation-config.level", "3"]).compilation_config == {"level": 3}
    assert any("XLA always compiles the whole step" in r.getMessage() for r in caplog.records)
    caplog.clear()
    parse(["-cc.cudagraph_mode", "FULL"])
    assert ["cudagraph_mode" in r.getMessage() for r in caplog.records] == [True]
    with pytest.raises(ValueError, match="--compilation-config: unknown key 'bogus'"):
        parse(["--compilation-config", '{"bogus": 1}'])


def test_cuda_graph_sizes_become_compile_buckets():
    def sizes(*argv):
        return parse_serve_args(list(argv)).engine_args.compile_sizes

    assert sizes("--cudagraph-capture-sizes", "1", "2", "8") == (1, 2, 8)
    assert sizes("--cuda-graph-sizes", "1", "4") == (1, 4)
    assert sizes("--cuda-graph-sizes", "24") == (1, 2, 4, 8, 16, 24)
    assert sizes("--max-cudagraph-capture-size", "8") == (1, 2, 4, 8)
    assert sizes("--cuda-graph-bs", "2", "6") == (2, 6)
    assert sizes("--cuda-graph-bs", "2", "6", "64", "--cuda-graph-max-bs", "8") == (2, 6)
    with pytest.raises(ValueError, match="conflicting compile sizes"):
        sizes("--cudagraph-capture-sizes", "1", "--cuda-graph-bs", "2")


def test_config_file_with_command_line_override(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({
        "model": "from-file", "port": 1234, "max_num_seqs": 8, "enable-prefix-caching": False,
        "served-model-name": ["a", "b"], "trust_remote_code": True, "middleware": ["m.x"],
        "compilation_config": {"cudagraph_capture_sizes": [1, 2]}, "allowed_origins": ["o"]}))
    ns = parse_serve_args(["--config", str(path), "--port", "4321", "--max-num-seqs", "3"])
    e = ns.engine_args
    assert (ns.port, e.max_num_seqs, e.model) == (4321, 3, "from-file")
    assert e.enable_prefix_caching is False and e.trust_remote_code is True
    assert ns.served_model_name == ["a", "b"] and ns.middleware == ["m.x"]
    assert e.compile_sizes == (1, 2) and ns.allowed_origins == ["o"]
    assert parse_serve_args(["cli-model", f"--config={path}"]).engine_args.model == "cli-model"
    path.write_text("no_such_flag: 1\n")
    with pytest.raises(ValueError, match="unknown key 'no_such_flag'"):
        parse_serve_args(["--config", str(path)])


def test_switches_take_true_false_values():
    assert parse_serve_args(["--enforce-eager", "false"]).engine_args.enforce_eager is False
    assert parse_serve_args(["--enforce-eager=True"]).engine_args.enforce_eager is True
    e = parse_serve_args(["--enable-prefix-caching=false", "m"]).engine_args
    assert e.enable_prefix_caching is False and e.model == "m"


def test_readable_numbers_and_no_cap_values(caplog):
    e = parse_serve_args(["--max-model-len", "1K", "--max-num-batched-tokens", "2k",
                          "--kv-cache-memory-bytes", "1.5G"]).engine_args
    assert (e.max_model_len, e.max_num_batched_tokens) == (1024, 2000)
    assert e.kv_cache_memory_bytes == int(1.5 * 1024**3)
    assert parse_serve_args(["--max-model-len", "auto"]).engine_args.max_model_len is None
    caplog.set_level(logging.WARNING, logger="jaxserve.cli")
    assert parse_serve_args(["--max-logprobs", "-1"]).engine_args.max_logprobs == 20
    assert "--max-logprobs -1" in caplog.text


def test_model_positional_or_flag():
    assert parse_serve_args(["a"]).engine_args.model == "a"
    assert parse_serve_args(["--model", "a", "a"]).engine_args.model == "a"
    assert parse_serve_args(["--port", "1", "a", "--dtype", "float32"]).model == "a"
    with pytest.raises(ValueError, match="'b' and --model 'a' differ"):
        parse_serve_args(["--model", "a", "b"])


def test_device_sets_jax_platforms_without_initialising_jax():
    import jax

    before = jax.config.jax_platforms
    try:
        parse_serve_args(["--device", "gpu"])
        assert os.environ["JAX_PLATFORMS"] == "cuda" and jax.config.jax_platforms == "cuda"
    finally:
        jax.config.update("jax_platforms", before)
    with pytest.raises(ValueError, match="--device neuron is not supported"):
        parse_serve_args(["--device", "neuron"])


def test_hf_token_sets_the_environment():
    parse_serve_args(["--hf-token", "hf_abc"])
    assert os.environ["HF_TOKEN"] == "hf_abc"


def _help(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        parse_serve_args(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_help_all_groups_and_says_what_happens(capsys):
    code, out, _ = _help(capsys, "--help=all")
    assert code == 0
    for text in ("ModelConfig:", "CacheConfig:", "SchedulerConfig:", "Frontend:",
                 "SGLang spellings:", "Worker:", "ignored on JAX:",
                 "not implemented in jaxserve yet:", "compile buckets"):
        assert text in out
    assert all(f.names[0] in out for f in FLAGS)


def test_default_help_is_short_and_shows_what_applies(capsys):
    code, out, _ = _help(capsys, "--help")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) < 200, len(lines)  # --help=all is over 1,000
    assert max(map(len, lines)) <= 100
    for group in ("Frontend:", "ModelConfig:", "CacheConfig:", "SchedulerConfig:", "Worker:"):
        assert group in out
    assert "--help=all" in out and "--help=CacheConfig" in out  # how to ask for more
    assert "ignored on JAX" not in out and "not implemented in jaxserve yet:" not in out
    shown = {line.split()[0].rstrip(",") for line in lines if line.startswith("  -")}
    for flag in FLAGS:
        if flag.kind in (WARN, REFUSE):
            assert flag.names[0] not in shown, flag.names[0]
    line = next(line for line in lines if line.startswith("  --gpu-memory-utilization "))
    assert "(default: 0.9)" in line
    line = next(line for line in lines if line.startswith("  --enable-prefix-caching "))
    assert "(default: on)" in line
    assert _help(capsys, "-h")[1] == out


@pytest.mark.parametrize("topic", ["CacheConfig", "cacheconfig", "CACHECONFIG"])
def test_help_group_lists_that_group(capsys, topic):
    code, out, _ = _help(capsys, f"--help={topic}")
    assert code == 0 and "CacheConfig:" in out
    cache = next(flags for title, _, flags in serve_flags.GROUPS if title == "CacheConfig")
    for flag in cache:  # those that apply and those that do not
        assert flag.names[0] in out
    assert "--max-num-seqs" not in out and "ModelConfig:" not in out


@pytest.mark.parametrize("topic", ["max-num-seqs", "--max-num-seqs", "max_num_seqs"])
def test_help_flag_shows_that_flag(capsys, topic):
    code, out, _ = _help(capsys, f"--help={topic}")
    assert code == 0
    assert "--max-num-seqs" in out and "SchedulerConfig:" in out
    assert "--max-num-batched-tokens" not in out


def test_help_word_lists_the_flags_that_hold_it(capsys):
    code, out, _ = _help(capsys, "--help=prefix-caching")
    assert code == 0
    assert "--enable-prefix-caching" in out and "--prefix-caching-hash-algo" in out
    assert "--max-num-seqs" not in out


def test_help_unknown_topic_lists_the_groups(capsys):
    code, out, err = _help(capsys, "--help=NoSuchGroup")
    assert code == 2 and not out
    assert "NoSuchGroup" in err
    for group in ("ModelConfig", "CacheConfig", "SchedulerConfig", "Frontend"):
        assert group in err


def test_cli_serve_help_is_short(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0 and len(capsys.readouterr().out.splitlines()) < 200


def test_gpu_memory_utilization_on_cpu_says_what_it_means(caplog, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    with caplog.at_level(logging.WARNING, logger="jaxserve.cli"):
        parse_serve_args(["--gpu-memory-utilization", "0.5"])
    lines = [r.getMessage() for r in caplog.records if "on CPU" in r.getMessage()]
    assert len(lines) == 1 and "host RAM" in lines[0] and "--gpu-memory-utilization 0.5" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxserve.cli"):
        parse_serve_args([])  # not given: nothing to explain
        monkeypatch.setenv("JAX_PLATFORMS", "tpu")
        parse_serve_args(["--mem-fraction-static", "0.5"])  # on a TPU it means what it says
    assert not [r for r in caplog.records if "on CPU" in r.getMessage()]


def test_cli_serve_reports_refusals(capsys):
    assert cli.main(["serve", "--enable-sleep-mode"]) == 2
    assert "--enable-sleep-mode is not implemented" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "serve" in capsys.readouterr().out


def test_generate_parser_reads_json_and_list_fields():
    ns = cli.build_parser().parse_args(["generate", "--hf-overrides", '{"a": 1}',
                                        "--compile-sizes", "8", "16"])
    e = cli._engine_args(ns)
    assert e.hf_overrides == {"a": 1} and e.compile_sizes == (8, 16)


def test_flags_and_engine_args_cannot_drift():
    """Every ENGINE flag is an EngineArgs field, and every field is set by some flag (the two
    below through their vLLM counterparts: CUDA-graph sizes and --compilation-config)."""
    import dataclasses

    from jaxserve.engine.args import EngineArgs
    from jaxserve.entrypoints.serve_flags import ENGINE

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    engine_flags = {f.key for f in FLAGS if f.kind == ENGINE}
    assert engine_flags <= fields
    mapped = {"compile_sizes", "compilation_cache_dir"}
    assert fields - {f.key for f in FLAGS} == mapped
    ns = parse_serve_args(["--cuda-graph-sizes", "4", "8", "--compilation-config",
                           '{"cache_dir": "/tmp/xla-cache"}'])
    assert ns.engine_args.compile_sizes == (4, 8)
    assert ns.engine_args.compilation_cache_dir == "/tmp/xla-cache"


def test_the_snapshot_of_the_flag_lists_is_current():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: nothing to compare the snapshot with")
    for name in FLAG_LISTS:
        assert (SNAPSHOT / name).read_text() == (SHARED / name).read_text(), \
            f"tests/data/{name} is stale: copy it again from {SHARED}"


# ---- tools, reasoning and structured outputs --------------------------------------------------
def test_tool_and_reasoning_parsers_are_checked_at_start_up():
    ns = parse_serve_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                           "--reasoning-parser", "qwen3"])
    assert (ns.enable_auto_tool_choice, ns.tool_call_parser, ns.reasoning_parser) == (
        True, "hermes", "qwen3")
    # vLLM puts the reasoning parser into the structured outputs config too.
    assert ns.engine_args.structured_outputs_config == {"reasoning_parser": "qwen3"}
    with pytest.raises(ValueError, match=r"^--tool-call-parser nope: no such tool parser; "
                                         r"valid names: .*hermes"):
        parse_serve_args(["--tool-call-parser", "nope"])
    with pytest.raises(ValueError, match=r"^--reasoning-parser nope: no such reasoning parser"):
        parse_serve_args(["--reasoning-parser", "nope"])
    with pytest.raises(ValueError, match=r"^--enable-auto-tool-choice needs --tool-call-parser"):
        parse_serve_args(["--enable-auto-tool-choice"])
    # SGLang's names of the same formats.
    ns = parse_serve_args(["--tool-call-parser", "qwen25", "--reasoning-parser", "deepseek-r1"])
    assert (ns.tool_call_parser, ns.reasoning_parser) == ("hermes", "deepseek_r1")
    assert parse_serve_args([]).tool_call_parser is None


def test_enable_reasoning_is_deprecated(caplog):
    with pytest.raises(ValueError, match=r"^--enable-reasoning needs --reasoning-parser"):
        parse_serve_args(["--enable-reasoning"])
    caplog.set_level(logging.WARNING, logger="jaxserve.cli")
    parse_serve_args(["--enable-reasoning", "--reasoning-parser", "deepseek_r1"])
    assert any("--enable-reasoning is deprecated" in r.getMessage() for r in caplog.records)


def test_parser_plugins_register_before_the_names_are_checked(tmp_path):
    tool_plugin = tmp_path / "my_tools.py"
    tool_plugin.write_text(
        "from jaxserve.entrypoints.openai.tool_parsers import ToolParser, ToolParserManager\n"
        "@ToolParserManager.register('cli_test_tools')\n"
        "class P(ToolParser):\n    pass\n")
    reasoning_plugin = tmp_path / "my_reasoning.py"
    reasoning_plugin.write_text(
        "from jaxserve.reasoning import ReasoningParser, ReasoningParserManager\n"
        "@ReasoningParserManager.register('cli_test_reasoning')\n"
        "class R(ReasoningParser):\n    end_markers = ('</r>',)\n")
    ns = parse_serve_args(["--tool-parser-plugin", str(tool_plugin), "--tool-call-parser",
                           "cli_test_tools", "--reasoning-parser-plugin", str(reasoning_plugin),
                           "--reasoning-parser", "cli_test_reasoning"])
    assert (ns.tool_call_parser, ns.reasoning_parser) == ("cli_test_tools", "cli_test_reasoning")
    with pytest.raises(ValueError, match=r"^--tool-parser-plugin /no/such.py: "):
        parse_serve_args(["--tool-parser-plugin", "/no/such.py"])


@pytest.mark.parametrize("argv, config", [
    (["--guided-decoding-backend", "llguidance"], {"backend": "llguidance"}),
    (["--guided-decoding-backend", "auto"], {"backend": "auto"}),
    (["--guided-decoding-disable-any-whitespace", "--guided-decoding-disable-fallback"],
     {"disable_any_whitespace": True, "disable_fallback": True}),
    (["--grammar-backend", "llguidance"], {"backend": "llguidance"}),
    (["--guided-decoding-disable-additional-properties"], {"disable_additional_properties": True}),
    (["--structured-outputs-config.backend", "guidance",
      "--guided-decoding-disable-any-whitespace"],
     {"backend": "guidance", "disable_any_whitespace": True}),
    ([], None),
])
def test_guided_decoding_flags_map_onto_the_structured_outputs_config(argv, config):
    assert parse_serve_args(argv).engine_args.structured_outputs_config == config


@pytest.mark.parametrize("argv, message", [
    (["--guided-decoding-backend", "xgrammar"], r"^--guided-decoding-backend xgrammar is not "
                                                "available"),
    (["--guided-decoding-backend", "outlines"], r"^--guided-decoding-backend outlines is not "),
    (["--grammar-backend", "xgrammar"], r"^--grammar-backend xgrammar is not available"),
    (["--grammar-backend", "outlines"], r"^--grammar-backend outlines is not available"),
    (["--structured-outputs-config", '{"backend": "guidance"}', "--guided-decoding-backend",
      "llguidance"], r"^--guided-decoding-backend llguidance contradicts "
                     r"--structured-outputs-config backend=guidance"),
])
def test_structured_output_flags_jaxserve_lacks_are_refused_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_serve_args(argv)
