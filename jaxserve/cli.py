"""The `jaxserve` command: `generate` (one-shot, offline) and `convert` (to an orbax folder)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from jaxserve import __version__


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
        parser.add_argument(flag, type=base, default=f.default)


def _engine_args(ns: argparse.Namespace):
    from jaxserve.engine.args import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in names})


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"jaxserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
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
    conv = sub.add_parser("convert", help="save a model as an orbax folder that loads fast")
    conv.add_argument("output", help="folder to write")
    _add_engine_args(conv)
    conv.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s] %(message)s",
                        datefmt="%H:%M:%S")
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
