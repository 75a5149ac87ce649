"""Compare two OpenAI-compatible servers' HTTP responses, field by field.

Sends one fixed suite of requests (greedy, a few tokens each, one at a time) to each server, records
status, content type and body (a stream as its list of parsed chunks), then compares the records:
key sets at every level, value types, and the values of deterministic fields. The report is
markdown, one section per case.

    # both servers live
    python scripts/api_compare.py --url-a http://127.0.0.1:8101 --name-a jaxserve \\
        --url-b http://127.0.0.1:8100 --name-b vllm --report /tmp/report.md
    # record one server, compare records later
    python scripts/api_compare.py --record-only http://127.0.0.1:8100 --name vllm --out vllm.json
    python scripts/api_compare.py --compare jaxserve.json vllm.json

Standard library only, so it runs under any Python (the project's or vLLM's venv).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import math
import re
import sys
import time
import urllib.parse
from typing import Any

MODEL = "{model}"  # replaced by the first id the server lists under /v1/models
PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]  # PROMPT in SmolLM2's tokenizer
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 8}
HEADERS_OF_INTEREST = ("content-type", "cache-control", "x-request-id", "transfer-encoding")


def _cmpl(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, **GREEDY, **kw}


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": QUESTION, **GREEDY, **kw}


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
# (name, method, path, body); a str body is sent as it is (for the invalid-JSON case).
CASES: list[tuple[str, str, str, Any]] = [
    ("models", "GET", "/v1/models", None),
    ("cmpl_string", "POST", CMPL, _cmpl()),
    ("cmpl_token_ids", "POST", CMPL, _cmpl(prompt=PROMPT_IDS)),
    ("cmpl_batch", "POST", CMPL, _cmpl(prompt=[PROMPT, "Once upon a time"])),
    ("cmpl_n2_seed", "POST", CMPL, _cmpl(n=2, seed=1234, temperature=1.0)),
    ("cmpl_logprobs2", "POST", CMPL, _cmpl(logprobs=2)),
    ("cmpl_echo_logprobs", "POST", CMPL, _cmpl(echo=True, logprobs=1, max_tokens=4)),
    ("cmpl_stop", "POST", CMPL, _cmpl(stop=[".", "\n"], max_tokens=12)),
    ("cmpl_stream_usage", "POST", CMPL, _cmpl(stream=True, stream_options={"include_usage": True})),
    (
        "cmpl_stream_n2",
        "POST",
        CMPL,
        _cmpl(stream=True, n=2, seed=1234, temperature=1.0, max_tokens=4),
    ),
    ("chat_plain", "POST", CHAT, _chat()),
    ("chat_logprobs", "POST", CHAT, _chat(logprobs=True, top_logprobs=2)),
    ("chat_stream_usage", "POST", CHAT, _chat(stream=True, stream_options={"include_usage": True})),
    (
        "chat_stream_n2",
        "POST",
        CHAT,
        _chat(stream=True, n=2, seed=1234, temperature=1.0, max_tokens=4),
    ),
    (
        "chat_max_completion_tokens",
        "POST",
        CHAT,
        {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_completion_tokens": 5},
    ),
    ("chat_stop", "POST", CHAT, _chat(stop=["."], max_tokens=16)),
    ("tokenize_prompt", "POST", "/tokenize", {"model": MODEL, "prompt": PROMPT}),
    ("tokenize_messages", "POST", "/tokenize", {"model": MODEL, "messages": QUESTION}),
    (
        "tokenize_token_strs",
        "POST",
        "/tokenize",
        {"model": MODEL, "prompt": PROMPT, "return_token_strs": True},
    ),
    ("detokenize", "POST", "/detokenize", {"model": MODEL, "tokens": PROMPT_IDS}),
    ("health", "GET", "/health", None),
    ("version", "GET", "/version", None),
    ("ping_get", "GET", "/ping", None),
    ("ping_post", "POST", "/ping", None),
    ("load", "GET", "/load", None),
    ("metrics", "GET", "/metrics", None),
    ("err_context_overflow", "POST", CMPL, _cmpl(prompt=PROMPT_IDS * 100, max_tokens=100)),
    ("err_prompt_too_long", "POST", CMPL, _cmpl(prompt=PROMPT_IDS * 120)),
    ("err_n2_greedy", "POST", CMPL, _cmpl(n=2)),
    ("err_max_tokens_overflow", "POST", CMPL, _cmpl(max_tokens=600)),
    ("err_logprobs_30", "POST", CMPL, _cmpl(logprobs=30)),
    ("err_chat_top_logprobs_30", "POST", CHAT, _chat(logprobs=True, top_logprobs=30)),
    ("err_temperature_negative", "POST", CMPL, _cmpl(temperature=-1)),
    ("err_unknown_model", "POST", CMPL, {**_cmpl(), "model": "no-such-model"}),
    ("err_empty_prompt", "POST", CMPL, _cmpl(prompt="")),
    ("err_missing_role", "POST", CHAT, _chat(messages=[{"content": "hi"}])),
    ("err_seed_2_64", "POST", CMPL, _cmpl(seed=2**64)),
    ("err_invalid_json", "POST", CMPL, '{"model": "x", "prompt": '),
    (
        "err_stream_options_without_stream",
        "POST",
        CMPL,
        _cmpl(stream_options={"include_usage": True}),
    ),
    ("err_token_out_of_vocab", "POST", CMPL, _cmpl(prompt=[504, 10**6])),
]

# Values that differ on every call; their presence and type are still compared.
VOLATILE_KEYS = {"id", "created", "system_fingerprint", "request_id"}
# Dicts keyed by data (token strings), not schema: compared as values, not key sets.
DATA_KEYED = re.compile(r"(^|\.)choices\[\d+\]\.logprobs\.top_logprobs\[\d+\]$")
FLOAT_TOL = 1e-3


# ----- recording ---------------------------------------------------------------------------
def _request(base: str, method: str, path: str, body: Any, timeout: float) -> dict[str, Any]:
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
    headers = {"Content-Type": "application/json"} if data is not None else {}
    start = time.perf_counter()
    conn.request(method, url.path.rstrip("/") + path, body=data, headers=headers)
    resp = conn.getresponse()
    raw = resp.read().decode("utf-8", "replace")
    conn.close()
    rec: dict[str, Any] = {
        "status": resp.status,
        "headers": {k: resp.getheader(k) for k in HEADERS_OF_INTEREST if resp.getheader(k)},
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    ctype = (resp.getheader("content-type") or "").split(";")[0].strip()
    if ctype == "text/event-stream":
        rec["chunks"] = _parse_sse(raw)
    elif path == "/metrics":
        rec["body"] = {"metric_names": _metric_names(raw)}
    else:
        try:
            rec["body"] = json.loads(raw) if raw else None
        except ValueError:
            rec["text"] = raw[:2000]
    return rec


def _parse_sse(raw: str) -> list[Any]:
    """Each `data:` event of an SSE stream, JSON-decoded where it is JSON ("[DONE]" is kept)."""
    chunks: list[Any] = []
    for line in raw.splitlines():
        if not line.startswith("data:"):
            if line.strip():
                chunks.append({"_non_data_line": line})
            continue
        payload = line[len("data:") :].strip()
        try:
            chunks.append(json.loads(payload))
        except ValueError:
            chunks.append(payload)
    return chunks


def _metric_names(text: str) -> list[str]:
    """`name type` of every `# TYPE` line of a Prometheus exposition."""
    names = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[:2] == ["#", "TYPE"]:
            names.append(f"{parts[2]} {parts[3]}")
    return sorted(names)


def _substitute(body: Any, model: str) -> Any:
    if isinstance(body, dict):
        return {k: _substitute(v, model) for k, v in body.items()}
    if isinstance(body, list):
        return [_substitute(v, model) for v in body]
    return model if body == MODEL else body


def record(base: str, name: str, timeout: float = 300.0) -> dict[str, Any]:
    """Send every case in CASES to `base`, one at a time; return what came back."""
    models = _request(base, "GET", "/v1/models", None, timeout)
    model = models["body"]["data"][0]["id"]
    out: dict[str, Any] = {
        "name": name, "url": base, "model": model,
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cases": {},
    }  # fmt: skip
    for case, method, path, body in CASES:
        sent = _substitute(body, model)
        print(f"[api_compare] {name}: {case}", file=sys.stderr, flush=True)
        try:
            rec = _request(base, method, path, sent, timeout)
        except (OSError, http.client.HTTPException) as e:
            rec = {"status": None, "exception": f"{type(e).__name__}: {e}"}
        out["cases"][case] = {"method": method, "path": path, "request": sent, **rec}
    return out


# ----- comparing ---------------------------------------------------------------------------
def _type(v: Any) -> str:
    return (
        "null"
        if v is None
        else {
            bool: "bool",
            int: "int",
            float: "float",
            str: "str",
            list: "list",
            dict: "object",
        }.get(type(v), type(v).__name__)
    )


def _short(v: Any, n: int = 70) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 3] + "..."


def _generic(path: str) -> str:
    return re.sub(r"\[\d+\]", "[*]", path)


class Diff:
    """Differences of one case, split into structure (keys, types) and values."""

    def __init__(self, a: str, b: str) -> None:
        self.a, self.b = a, b
        self.structure: dict[str, str] = {}  # generic path -> message, deduplicated over indices
        self.values: list[str] = []
        self.max_float_diff = 0.0  # largest |x - y| of the floats compared

    def walk(self, x: Any, y: Any, path: str) -> None:
        key = path.rsplit(".", 1)[-1]
        if isinstance(x, dict) and isinstance(y, dict) and not DATA_KEYED.search(path):
            for k in sorted(x.keys() - y.keys()):
                self.structure.setdefault(
                    _generic(f"{path}.{k}"), f"only in {self.a} (= {_short(x[k], 40)})"
                )
            for k in sorted(y.keys() - x.keys()):
                self.structure.setdefault(
                    _generic(f"{path}.{k}"), f"only in {self.b} (= {_short(y[k], 40)})"
                )
            for k in sorted(x.keys() & y.keys()):
                self.walk(x[k], y[k], f"{path}.{k}")
            return
        if isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                self.values.append(f"`{path}`: length {len(x)} vs {len(y)}")
            for i, (u, v) in enumerate(zip(x, y)):
                self.walk(u, v, f"{path}[{i}]")
            return
        tx, ty = _type(x), _type(y)
        numeric = {tx, ty} <= {"int", "float"}
        if tx != ty:
            self.structure.setdefault(
                _generic(path), f"type {tx} vs {ty} ({_short(x, 40)} vs {_short(y, 40)})"
            )
            if not numeric:
                return
        if key in VOLATILE_KEYS and not path.startswith("$.data["):
            return
        if isinstance(x, dict):  # data-keyed dict: compare as a value
            if x.keys() != y.keys():
                self.values.append(f"`{path}`: {_short(x)} vs {_short(y)}")
                return
            for k in x:
                self.walk(x[k], y[k], f"{path}[{json.dumps(k, ensure_ascii=False)}]")
            return
        if numeric and "float" in (tx, ty):
            if math.isfinite(x) and math.isfinite(y):
                self.max_float_diff = max(self.max_float_diff, abs(x - y))
            if math.isclose(x, y, abs_tol=FLOAT_TOL) or x == y:
                return
        if x != y:
            self.values.append(f"`{path}`: {_short(x)} vs {_short(y)}")


def _stream_summary(chunks: list[Any]) -> dict[str, Any]:
    """A stream reassembled: text, finish reasons, usage, and how its chunks are laid out."""
    texts: dict[int, str] = {}
    finish: dict[int, Any] = {}
    roles: dict[int, Any] = {}
    usage_chunks, done, empty_choice_chunks, layout = [], 0, 0, []
    for c in chunks:
        if c == "[DONE]":
            done += 1
            layout.append("[DONE]")
            continue
        if not isinstance(c, dict):
            layout.append("?")
            continue
        choices = c.get("choices") or []
        if not choices:
            empty_choice_chunks += 1
        if c.get("usage") is not None:
            usage_chunks.append(c["usage"])
        tags = []
        for ch in choices:
            i = ch.get("index", 0)
            piece = ch.get("text")
            if piece is None:
                delta = ch.get("delta") or {}
                piece = delta.get("content")
                if "role" in delta:
                    roles[i] = delta["role"]
                    tags.append(f"role{i}")
            texts[i] = texts.get(i, "") + (piece or "")
            if ch.get("finish_reason") is not None:
                finish[i] = ch["finish_reason"]
                tags.append(f"fin{i}")
        if not tags:
            tags.append("usage" if not choices and c.get("usage") else f"n={len(choices)}")
        layout.append("+".join(tags))
    return {
        "num_chunks": len(chunks), "done_events": done, "texts": texts,
        "finish_reasons": finish, "roles": roles, "usage_chunks": usage_chunks,
        "chunks_without_choices": empty_choice_chunks,
        "layout": _runs(layout),
    }  # fmt: skip


def _runs(tags: list[str]) -> str:
    """`['a', 'b', 'b', 'b', 'c']` -> 'a, b x3, c'."""
    out: list[str] = []
    for t in tags:
        if out and out[-1].split(" x")[0] == t:
            base, _, n = out[-1].partition(" x")
            out[-1] = f"{base} x{int(n or 1) + 1}"
        else:
            out.append(t)
    return ", ".join(out)


def compare_case(a: dict[str, Any], b: dict[str, Any], na: str, nb: str) -> dict[str, Any]:
    """Differences of one case between records `a` and `b` (names `na`, `nb`)."""
    res: dict[str, Any] = {"status": (a.get("status"), b.get("status")), "notes": []}
    ha, hb = a.get("headers", {}), b.get("headers", {})
    res["headers"] = [f"`{k}`: {_short(ha.get(k))} vs {_short(hb.get(k))}"
                      for k in sorted(ha.keys() | hb.keys()) if ha.get(k) != hb.get(k)
                      and k != "x-request-id"]  # fmt: skip
    for r, n in ((a, na), (b, nb)):
        if "text" in r:
            res["notes"].append(f"{n} body is not JSON: {_short(r['text'], 120)}")
        if "exception" in r:
            res["notes"].append(f"{n}: {r['exception']}")
    diff = Diff(na, nb)
    if "chunks" in a and "chunks" in b:
        sa, sb = _stream_summary(a["chunks"]), _stream_summary(b["chunks"])
        diff.walk(sa, sb, "stream")
        # key sets of the chunks: every chunk of one side against every chunk of the other
        # would be noise, so compare the union of generic paths and their types.
        pa, pb = _paths(a["chunks"]), _paths(b["chunks"])
        for p in sorted(pa.keys() - pb.keys()):
            diff.structure[p] = f"only in {na} (type {'/'.join(sorted(pa[p]))})"
        for p in sorted(pb.keys() - pa.keys()):
            diff.structure[p] = f"only in {nb} (type {'/'.join(sorted(pb[p]))})"
        for p in sorted(pa.keys() & pb.keys()):
            if pa[p] != pb[p]:
                diff.structure[p] = f"types {'/'.join(sorted(pa[p]))} vs {'/'.join(sorted(pb[p]))}"
        res["stream"] = (sa, sb)
    elif "chunks" in a or "chunks" in b:
        res["notes"].append(f"stream in {na if 'chunks' in a else nb} only")
    elif _metrics(a) is not None and _metrics(b) is not None:
        ma, mb = _metrics(a), _metrics(b)
        res["metrics"] = (sorted(ma - mb), sorted(mb - ma), len(ma & mb))
    else:
        diff.walk(a.get("body"), b.get("body"), "$")
    res["structure"], res["values"] = diff.structure, diff.values
    res["max_float_diff"] = diff.max_float_diff
    return res


def _metrics(rec: dict[str, Any]) -> set[str] | None:
    body = rec.get("body")
    return set(body["metric_names"]) if isinstance(body, dict) and "metric_names" in body else None


def _paths(obj: Any, path: str = "chunk", out: dict[str, set[str]] | None = None):
    """Generic path -> set of value types seen there, over every chunk of a stream."""
    out = {} if out is None else out
    if isinstance(obj, list):
        if path == "chunk":
            for c in obj:
                _paths(c, "chunk", out)
            return out
        for v in obj:
            _paths(v, f"{path}[*]", out)
        out.setdefault(path, set()).add("list")
    elif isinstance(obj, dict) and not DATA_KEYED.search(path.replace("[*]", "[0]")):
        for k, v in obj.items():
            _paths(v, f"{path}.{k}", out)
        out.setdefault(path, set()).add("object")
    else:
        out.setdefault(path, set()).add(_type(obj))
    return out


def report(ra: dict[str, Any], rb: dict[str, Any]) -> str:
    """A markdown report of the differences between two records."""
    na, nb = ra["name"], rb["name"]
    lines = [
        f"# API comparison: {na} vs {nb}",
        "",
        f"- {na}: {ra['url']} (model `{ra['model']}`), recorded {ra['recorded_at']}",
        f"- {nb}: {rb['url']} (model `{rb['model']}`), recorded {rb['recorded_at']}",
        f"- values: volatile keys ({', '.join(sorted(VOLATILE_KEYS))}) not compared; "
        f"floats to {FLOAT_TOL}",
        "",
        f"| case | status {na} | status {nb} | structure | values |",
        "|---|---|---|---|---|",
    ]
    results = {}
    for case in ra["cases"]:
        if case not in rb["cases"]:
            continue
        res = compare_case(ra["cases"][case], rb["cases"][case], na, nb)
        results[case] = res
        sa, sb = res["status"]
        lines.append(
            f"| {case} | {sa} | {sb}{' **!**' if sa != sb else ''} | "
            f"{len(res['structure'])} | {len(res['values'])} |"
        )
    for case, res in results.items():
        ca = ra["cases"][case]
        lines += ["", f"## {case}", "",
                  f"`{ca['method']} {ca['path']}` {_short(ca.get('request'), 200) if ca.get('request') is not None else ''}",
                  ""]  # fmt: skip
        sa, sb = res["status"]
        if sa != sb:
            lines.append(f"- **status**: {na} {sa}, {nb} {sb}")
        lines += [f"- header {h}" for h in res["headers"]]
        lines += [f"- note: {n}" for n in res["notes"]]
        if "stream" in res:
            for s, n in zip(res["stream"], (na, nb)):
                lines.append(f"- {n} stream: {s['num_chunks']} events: {s['layout']}")
        if "metrics" in res:
            only_a, only_b, common = res["metrics"]
            lines.append(
                f"- metrics: {common} in both; {len(only_a)} only in {na}, "
                f"{len(only_b)} only in {nb}"
            )
            lines += [f"  - only in {na}: `{m}`" for m in only_a]
            lines += [f"  - only in {nb}: `{m}`" for m in only_b]
        if res["max_float_diff"]:
            lines.append(f"- largest float difference: {res['max_float_diff']:.2e}")
        if res["structure"]:
            lines.append("- structure:")
            lines += [f"  - `{p}`: {m}" for p, m in sorted(res["structure"].items())]
        if res["values"]:
            lines.append(f"- values ({na} vs {nb}):")
            lines += [f"  - {v}" for v in res["values"][:25]]
            if len(res["values"]) > 25:
                lines.append(f"  - ... and {len(res['values']) - 25} more")
        differs = res["structure"] or res["values"] or any(res.get("metrics", ())[:2])
        if not (sa != sb or res["headers"] or res["notes"] or differs):
            lines.append("- identical (up to volatile fields)")
        for r, n in ((ca, na), (rb["cases"][case], nb)):
            err = (r.get("body") or {}).get("error") if isinstance(r.get("body"), dict) else None
            if err is not None or (r.get("status") or 200) >= 400:
                lines.append(f"- {n} body: {_short(r.get('body', r.get('text')), 300)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url-a"), p.add_argument("--url-b")
    p.add_argument("--name-a", default="a"), p.add_argument("--name-b", default="b")
    p.add_argument("--out-a"), p.add_argument("--out-b")
    p.add_argument("--record-only", metavar="URL", help="record one server to --out")
    p.add_argument("--name", help="name of the --record-only server (default: its URL)")
    p.add_argument("--out", help="where --record-only writes")
    p.add_argument("--compare", nargs=2, metavar=("FILE_A", "FILE_B"))
    p.add_argument("--report", help="write the markdown report here (default: stdout)")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    args = p.parse_args(argv)

    def save(rec: dict[str, Any], path: str | None) -> None:
        if path:
            with open(path, "w") as f:
                json.dump(rec, f, indent=1, ensure_ascii=False)
                f.write("\n")

    if args.record_only:
        if not args.out:
            p.error("--record-only needs --out")
        save(record(args.record_only, args.name or args.record_only, args.timeout), args.out)
        return 0
    if args.compare:
        ra, rb = (json.load(open(f)) for f in args.compare)
    elif args.url_a and args.url_b:
        ra = record(args.url_a, args.name_a, args.timeout)
        save(ra, args.out_a)
        rb = record(args.url_b, args.name_b, args.timeout)
        save(rb, args.out_b)
    else:
        p.error("give --url-a and --url-b, --record-only URL --out FILE, or --compare A B")
    text = report(ra, rb)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
