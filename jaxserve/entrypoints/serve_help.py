"""`jaxserve serve --help`, answered as `vllm serve --help` answers it.

- `--help`: a short help: each of vLLM's help groups with the flags that take effect on jaxserve
  (one line each, with its default), and how to ask for more;
- `--help=all`: every flag, those ignored on JAX and those not implemented yet included;
- `--help=GROUP`: one group (`--help=CacheConfig`; case-insensitive);
- `--help=FLAG`: one flag (`--help=max-num-seqs`, `--help=--max-num-seqs`);
- `--help=WORD`: every flag whose name holds WORD; anything else is an error listing the groups.
"""

from __future__ import annotations

import argparse
import re
import sys

from jaxserve.entrypoints.serve_flags import (ALIAS, ENGINE, FRONTEND, GROUPS, MAPPED, SWITCH,
                                              WORKER, Flag)

# What the short help lists: flags that change what jaxserve does. The rest are vLLM's flags that
# are ignored on JAX (warn), refused until implemented, or ask for what jaxserve always does.
TAKES_EFFECT = (ENGINE, FRONTEND, WORKER, MAPPED, ALIAS)
_WIDTH = 100
_NAME_COLUMN = 34
_MORE = ("--help=all (every flag), --help=GROUP (one group, e.g. --help=CacheConfig; "
         "case-insensitive), --help=FLAG (one flag, e.g. --help=max-num-seqs), --help=WORD "
         "(flags whose name holds WORD)")


class HelpAction(argparse.Action):
    """`-h` / `--help[=TOPIC]`: print the help for TOPIC and exit (2 when nothing matches)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs="?", help=help,
                         metavar="TOPIC")

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            text = render_help(parser, values)
        except LookupError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        sys.stdout.write(text)
        parser.exit(0)


def render_help(parser: argparse.ArgumentParser, topic: str | None) -> str:
    """The help text for `--help=topic` (`None`: the short help); `LookupError` when no group
    or flag matches."""
    if topic is None:
        return short_help(parser)
    if topic.strip().lower() == "all":
        return parser.format_help()
    key = _norm(topic)
    for title, description, flags in GROUPS:
        if key in _group_keys(title):
            return _subset_help(parser, [(title, description, flags)])
    exact = _select(lambda f: key in map(_norm, f.names))
    if exact:
        return _subset_help(parser, exact)
    found = _select(lambda f: any(key in _norm(n) for n in f.names)) if key else []
    if found:
        return _subset_help(parser, found)
    raise LookupError(f"--help={topic}: no group or flag matches; the groups are "
                      f"{', '.join(_group_name(t) for t, _, _ in GROUPS)}; see also {_MORE}")


def short_help(parser: argparse.ArgumentParser) -> str:
    """Usage, then each group with its flags that take effect, one line each."""
    lines = [parser.format_usage().rstrip(), "", parser.description or "", "",
             "Flags that take effect on jaxserve, in vLLM's help groups. vLLM flags that mean "
             "nothing on JAX (a warning names them) and those not implemented yet (they are "
             "refused) are left out here.", f"More: {_MORE}.", ""]
    empty, hidden = [], 0
    for title, description, flags in GROUPS:
        shown = [f for f in flags if f.kind in TAKES_EFFECT]
        hidden += len(flags) - len(shown)
        if not shown:
            empty.append(_group_name(title))
            continue
        more = f" (+{len(flags) - len(shown)} more: --help={_group_name(title)})" \
            if len(shown) < len(flags) else ""
        lines.append(f"{title}: {description}{more}")
        lines += [_one_line(f) for f in shown]
        lines.append("")
    lines.append(f"Nothing in {', '.join(empty)} takes effect on jaxserve yet "
                 f"(--help=GROUP lists them). {hidden} flags in all are left out above.")
    return "\n".join(_wrap(line) for line in lines) + "\n"


def _one_line(flag: Flag) -> str:
    names = ", ".join(flag.names)
    if flag.type is SWITCH:  # off unless the line says on
        shown = "on" if flag.default is True else None
    elif flag.default in (None, argparse.SUPPRESS, "", []):
        shown = None
    else:
        shown = flag.default
    suffix = f" (default: {shown})" if shown is not None else ""
    head = f"  {names:<{_NAME_COLUMN - 2}} " if len(names) < _NAME_COLUMN - 2 else f"  {names} "
    note = flag.note
    room = _WIDTH - len(head) - len(suffix)
    if len(note) > room:
        note = note[:max(room - 3, 0)].rstrip() + "..."
    return head + note + suffix


def _wrap(line: str) -> str:
    """Prose lines wrap at the width; flag lines were cut to it already."""
    if line.startswith("  ") or len(line) <= _WIDTH:
        return line
    import textwrap

    return textwrap.fill(line, _WIDTH, break_on_hyphens=False, break_long_words=False)


def _subset_help(parser: argparse.ArgumentParser,
                 groups: list[tuple[str, str, tuple[Flag, ...]]]) -> str:
    """argparse's own help for some groups (or some flags of them) of `parser`."""
    from jaxserve.entrypoints.cli_args import add_flag_group

    sub = argparse.ArgumentParser(prog=parser.prog, usage=parser.usage, add_help=False,
                                  formatter_class=parser.formatter_class)
    for title, description, flags in groups:
        add_flag_group(sub, title, description, flags)
    return sub.format_help()


def _select(keep) -> list[tuple[str, str, tuple[Flag, ...]]]:
    """The groups, each with only the flags `keep` accepts; groups left empty are dropped."""
    out = []
    for title, description, flags in GROUPS:
        kept = tuple(f for f in flags if keep(f))
        if kept:
            out.append((title, description, kept))
    return out


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.strip().lstrip("-").lower())


def _group_name(title: str) -> str:
    """What to type after --help= for a group: `SpeculativeConfig (older vLLM)` -> its first
    word, `SGLang spellings` -> SGLang."""
    return title.split()[0]


def _group_keys(title: str) -> set[str]:
    return {_norm(title), _norm(_group_name(title))}
