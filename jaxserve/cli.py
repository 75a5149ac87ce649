"""The `jaxserve` command: `serve` (the OpenAI-compatible server, taking `vllm serve` flags),
`gateway` (workers register with it; it routes requests to them), `chat` and `complete` (clients of
a running server), `generate` (one-shot, offline), `convert` (to an orbax folder) and `bench`
(`bench serve`: load a server as `vllm bench serve` does; `bench throughput`: offline)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import logging.config
import os
import sys
import typing
from collections.abc import Callable, Iterable

from jaxserve import __version__, logs
from jaxserve.entrypoints.cli_args import add_serve_args, json_object, parse_serve_args

logger = logging.getLogger("jaxserve.cli")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineArgs` field, spelled as `vllm serve` spells it."""
    from jaxserve.engine.args import EngineArgs

    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        origin = typing.get_origin(base) or base
        if origin is dict:
            parser.add_argument(flag, type=json_object, default=f.default, help="JSON object")
        elif origin is tuple:
            item = typing.get_args(base)[0]
            parser.add_argument(flag, type=item, nargs="+", default=f.default)
        else:
            parser.add_argument(flag, type=base, default=f.default)


def _engine_args(ns: argparse.Namespace):
    from jaxserve.engine.args import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in vars(ns).items() if k in names}
    return EngineArgs(**kwargs)


def _generate(ns: argparse.Namespace) -> int:
    from jaxserve import LLM, SamplingParams

    llm = LLM(**dataclasses.asdict(_engine_args(ns)))
    params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, max_tokens=ns.max_tokens,
                            seed=ns.sampling_seed)
    prompts = ns.prompt or ["What is the capital of France?"]
    if ns.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                           use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        print(f"--- {prompt!r}\n{out.outputs[0].text}")
    return 0


def _convert(ns: argparse.Namespace) -> int:
    from jaxserve.config import ModelConfig
    from jaxserve.models.loader import load_model, save_orbax
    from jaxserve.models.source import resolve_model

    args = _engine_args(ns)
    source = resolve_model(args.model, download_dir=args.download_dir, revision=args.revision)
    cfg = ModelConfig.from_hf(source.hf_config)
    model = load_model(source, cfg, args.resolve_dtype(cfg), args.load_format)
    save_orbax(model, source.hf_config, ns.output, tokenizer=source.load_tokenizer(args.tokenizer))
    print(f"wrote {ns.output}; serve it with: jaxserve generate --model {ns.output}")
    return 0


def _serve(argv: list[str]) -> int:
    """`jaxserve serve ...`: parse (with --config, dotted keys, refusals), then run the server."""
    ns = parse_serve_args(argv)
    if ns.log_config_file:
        with open(ns.log_config_file) as f:
            logging.config.dictConfig(json.load(f))
    else:
        logging.getLogger().setLevel(ns.log_level.upper())
    if ns.engine_args.node_rank > 0:  # multi-host: no server here; run node 0's steps
        from jaxserve.engine.distributed import run_follower

        logging.getLogger("jaxserve").warning(
            "node %d of %d runs node 0's steps and serves no HTTP: the server's flags (--host, "
            "--port, --api-key, --gateway-address, ...) take effect on node 0 only",
            ns.engine_args.node_rank, ns.engine_args.nnodes)
        return run_follower(ns.engine_args)
    from jaxserve.entrypoints.openai.api_server import run_server

    return run_server(ns)


def _compile(argv: list[str]) -> int:
    """`jaxserve compile [MODEL] --target T [serve flags]`: every bucket of the engine step
    compiled for a TPU slice or GPU this machine need not have, with the memory plan."""
    from jaxserve.engine import targets

    pre = argparse.ArgumentParser(prog="jaxserve compile", add_help=False,
                                  usage="jaxserve compile [MODEL] --target TARGET [serve flags]")
    pre.add_argument("--target", required=True,
                     help=f"what to compile for: {', '.join(targets.TARGETS)} (GPUs also as "
                          "NAMExCOUNT, e.g. h100x8)")
    if argv in ([], ["-h"], ["--help"]):
        pre.print_help()
        print("\nAny `jaxserve serve` flag sets up the engine as it would run there (-tp, -dp, "
              "--enable-expert-parallel, --max-model-len, --max-num-seqs, --kv-cache-dtype, "
              "--gpu-memory-utilization, ...); only config.json is read.")
        return 0 if argv else 2
    ns, rest = pre.parse_known_args(argv)
    targets.prepare_environment()  # before JAX loads its plugins
    from jaxserve.engine.aot import run

    return run(parse_serve_args(rest).engine_args, ns.target)


def _gateway(ns: argparse.Namespace) -> int:
    """`jaxserve gateway ...`: the Gateway of docs/gateway.md, until SIGTERM or SIGINT."""
    from jaxserve.gateway.app import run_gateway
    from jaxserve.gateway.registry import GatewayConfig

    config = GatewayConfig(api_key=ns.api_key or None, gateway_token=ns.gateway_token or None,
                           load_balance_method=ns.load_balance_method,
                           unhealthy_after=ns.unhealthy_after, remove_after=ns.remove_after,
                           log_lines=ns.log_lines, worker_timeout=ns.worker_timeout)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else a line per relayed request
    return run_gateway(config, host=ns.host, port=ns.port,
                       uvicorn_log_level=ns.uvicorn_log_level)


def _add_gateway_args(parser: argparse.ArgumentParser) -> None:
    from jaxserve.gateway.registry import LOAD_BALANCE_METHODS, GatewayConfig

    default = GatewayConfig()
    parser.add_argument("--host", help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=9000, help="port (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("JAXSERVE_GATEWAY_API_KEY"),
                        help="key clients must send as `Authorization: Bearer KEY` "
                             "(default: env JAXSERVE_GATEWAY_API_KEY; none: open)")
    parser.add_argument("--gateway-token", default=os.environ.get("JAXSERVE_GATEWAY_TOKEN"),
                        help="token workers and monitoring must send as X-Gateway-Token or "
                             "?token= (default: env JAXSERVE_GATEWAY_TOKEN; none: open)")
    parser.add_argument("--load-balance-method", choices=LOAD_BALANCE_METHODS,
                        default=default.load_balance_method,
                        help="how a worker is chosen (default: %(default)s)")
    parser.add_argument("--unhealthy-after", type=float, default=default.unhealthy_after,
                        metavar="N", help="heartbeat intervals of silence before a worker is "
                                          "unhealthy (default: %(default)s)")
    parser.add_argument("--remove-after", type=float, default=default.remove_after, metavar="N",
                        help="heartbeat intervals of silence before a worker is removed "
                             "(default: %(default)s)")
    parser.add_argument("--log-lines", type=int, default=default.log_lines, metavar="N",
                        help="recent log lines kept per worker (default: %(default)s)")
    parser.add_argument("--worker-timeout", type=float, default=default.worker_timeout,
                        metavar="S", help="seconds a worker may stay silent (before its answer "
                                          "starts, or between chunks) before the request goes to "
                                          "another worker or fails (default: %(default)s)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.set_defaults(func=_gateway)


# ----------------------------------------------------------------------------- chat / complete
def _client(ns: argparse.Namespace):
    """An OpenAI client for `--url` and the model to ask: `--model-name`, else the first served."""
    from openai import OpenAI

    api_key = ns.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    client = OpenAI(base_url=ns.url, api_key=api_key)
    if ns.model_name:
        return client, ns.model_name
    models = client.models.list().data
    if not models:
        raise ValueError(f"{ns.url}/models lists no models; give --model-name")
    return client, models[0].id


# `jaxserve chat -q ...` must not ramble to the end of the context: vLLM's clients send no limit,
# and the server's default is all the context left.
CLIENT_MAX_TOKENS = 512


def _print_stream(pieces: Iterable[str | None], text: list[str]) -> None:
    """Write each streamed piece to stdout as it arrives, and append it to `text`."""
    try:
        for piece in pieces:
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
                text.append(piece)
    finally:  # a Ctrl-C too ends the line
        sys.stdout.write("\n")
        sys.stdout.flush()


def _sampling(ns: argparse.Namespace) -> dict:
    """The request fields `--max-tokens` and `--temperature` set (unset: the server's default)."""
    fields = {"max_tokens": ns.max_tokens, "temperature": ns.temperature}
    return {k: v for k, v in fields.items() if v is not None}


def _rounds(ns: argparse.Namespace, ask: Callable[[str], None], model: str) -> int:
    """`--quick MESSAGE`: one round; otherwise one round per line of stdin until EOF.

    Ctrl-C during a reply stops it (`ask` closes its stream, which aborts the request) and
    returns to the prompt, or exits with 130 after `--quick`; Ctrl-C or Ctrl-D at the prompt exits.
    """
    if ns.quick is not None:
        try:
            ask(ns.quick)
        except KeyboardInterrupt:
            return 130
        return 0
    sys.stderr.write(f"Using model {model}; one message per line, Ctrl-C stops a reply, "
                     "Ctrl-D quits.\n")
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            sys.stderr.write("\n")
            return 0
        if line.strip():
            try:
                ask(line.rstrip("\n"))
            except KeyboardInterrupt:
                sys.stderr.write("(reply stopped)\n")


def _chat(ns: argparse.Namespace) -> int:
    client, model = _client(ns)
    history = [{"role": "system", "content": ns.system_prompt}] if ns.system_prompt else []

    def ask(message: str) -> None:
        history.append({"role": "user", "content": message})
        reply: list[str] = []
        try:
            with client.chat.completions.create(model=model, messages=history, stream=True,
                                                **_sampling(ns)) as stream:
                _print_stream((c.choices[0].delta.content for c in stream if c.choices), reply)
        except KeyboardInterrupt:
            # NOTE: a reply stopped part way stays in the conversation, as it was shown; one
            # stopped before its first word takes its question with it.
            if reply:
                history.append({"role": "assistant", "content": "".join(reply)})
            else:
                history.pop()
            raise
        history.append({"role": "assistant", "content": "".join(reply)})

    return _rounds(ns, ask, model)


def _complete(ns: argparse.Namespace) -> int:
    client, model = _client(ns)

    def ask(prompt: str) -> None:
        with client.completions.create(model=model, prompt=prompt, stream=True,
                                       **_sampling(ns)) as stream:
            _print_stream((c.choices[0].text for c in stream if c.choices), [])

    return _rounds(ns, ask, model)


def _client_command(run: Callable[[argparse.Namespace], int]
                    ) -> Callable[[argparse.Namespace], int]:
    """`run`, reporting the server's errors (connection refused, 401, ...) as one line."""
    def command(ns: argparse.Namespace) -> int:
        from openai import OpenAIError

        try:
            return run(ns)
        except OpenAIError as e:
            print(f"jaxserve: error: {ns.url}: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # while finding the model, before any prompt
            sys.stderr.write("\n")
            return 130
    return command


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://localhost:8000/v1",
                        help="the server's OpenAI base URL (default: %(default)s)")
    parser.add_argument("--model-name", help="model to ask (default: the first in /v1/models)")
    parser.add_argument("--api-key", help="API key (default: env OPENAI_API_KEY, else EMPTY)")
    parser.add_argument("-q", "--quick", metavar="MESSAGE",
                        help="send one message, print the reply and exit")
    parser.add_argument("--max-tokens", type=int, default=CLIENT_MAX_TOKENS,
                        help="most tokens per reply (default: %(default)s)")
    parser.add_argument("--temperature", type=float,
                        help="sampling temperature (default: the server's, from the model's "
                             "generation config)")


def _add_bench_args(bench: argparse.ArgumentParser) -> None:
    """`jaxserve bench serve|throughput` (jaxserve/benchmarks; see docs/benchmarking.md)."""
    from jaxserve.benchmarks.serve import run_bench_serve
    from jaxserve.benchmarks.serve_args import add_bench_serve_args
    from jaxserve.benchmarks.throughput import add_bench_throughput_args, run_bench_throughput

    kinds = bench.add_subparsers(dest="bench_command", required=True)
    serve = kinds.add_parser("serve", help="load a running (or --launch'ed) server with requests "
                                           "and report latencies and throughput")
    add_bench_serve_args(serve)
    serve.set_defaults(func=run_bench_serve)
    throughput = kinds.add_parser("throughput", help="offline throughput of LLM.generate")
    add_bench_throughput_args(throughput)
    throughput.set_defaults(func=run_bench_throughput)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"jaxserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API (vllm serve flags)",
                           usage="jaxserve serve [MODEL] [options]", allow_abbrev=False)
    add_serve_args(serve)  # main() hands `serve` to parse_serve_args; this is for --help
    gateway = sub.add_parser("gateway", help="a Gateway that workers register with and that "
                                             "routes OpenAI requests to them")
    _add_gateway_args(gateway)
    chat = sub.add_parser("chat", help="chat with a running server")
    _add_client_args(chat)
    chat.add_argument("--system-prompt", help="system message that starts the conversation")
    chat.set_defaults(func=_client_command(_chat))
    complete = sub.add_parser("complete", help="complete prompts with a running server")
    _add_client_args(complete)
    complete.set_defaults(func=_client_command(_complete))
    gen = sub.add_parser("generate", help="generate text offline for a few prompts")
    gen.add_argument("prompt", nargs="*", help="prompts (default: a sample question)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="apply the chat template (default on)")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--sampling-seed", type=int, default=None)
    _add_engine_args(gen)
    gen.set_defaults(func=_generate)
    sub.add_parser("compile", help="compile the engine for a TPU slice or GPU (deviceless) and "
                                   "print its memory plan: jaxserve compile MODEL --target v5e-4")
    conv = sub.add_parser("convert", help="save a model as an orbax folder that loads fast")
    conv.add_argument("output", help="folder to write")
    _add_engine_args(conv)
    conv.set_defaults(func=_convert)
    bench = sub.add_parser("bench", help="benchmarks: serve (a server under load), throughput "
                                         "(offline)")
    _add_bench_args(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=logs.FORMAT, datefmt=logs.DATEFMT)
    argv = sys.argv[1:] if argv is None else list(argv)
    asks_help = any(a in ("-h", "--help") or a.startswith("--help=") for a in argv)
    if argv[:1] not in (["chat"], ["complete"], ["gateway"]) and not asks_help:  # no JAX there
        logs.quiet_startup()  # before JAX looks for accelerators
    if argv[:1] in (["chat"], ["complete"]):  # clients: the reply only, not each HTTP request
        for name in ("httpx", "httpx2", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if argv[:1] == ["serve"]:  # its own parser: --config, dotted keys and -O3 come first
            return _serve(argv[1:])
        if argv[:1] == ["compile"]:  # serve's flags, for a target
            return _compile(argv[1:])
        ns = build_parser().parse_args(argv)
        return ns.func(ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
