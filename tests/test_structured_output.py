"""Structured outputs: spec validation, llguidance-backed matchers driven by random logits with the
default model's tokenizer (every finished output must satisfy its constraint), the on-device
bitmask against its numpy reference, and the compiled-grammar cache."""

from __future__ import annotations

import json
import re
import threading

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jaxserve.structured_output import (
    GrammarBackend,
    StructuredOutputSpec,
    allocate_bitmask,
    allowed_tokens,
    apply_bitmask,
    ref_apply_bitmask,
    tool_call_spec,
)

V = 49152  # SmolLM2's logits width

# ---------------------------------------------------------------------------------------------
# Spec validation


@pytest.mark.parametrize("fields, field", [
    (dict(json={"type": "object"}, regex="a+"), "json"),
    (dict(choice=["a"], json_object=True), "choice"),
    (dict(), "json"),
    (dict(json={"type": "strnig"}), "json"),
    (dict(json={"minimum": "three"}), "json"),
    (dict(json=[{"type": "object"}]), "json"),
    (dict(json="{not json"), "json"),
    (dict(regex="a(b"), "regex"),
    (dict(regex=5), "regex"),
    (dict(choice=[]), "choice"),
    (dict(choice=["a", 2]), "choice"),
    (dict(choice="ab"), "choice"),
    (dict(grammar="  "), "grammar"),
])  # fmt: skip
def test_spec_rejects_bad_fields_naming_the_field(fields, field):
    with pytest.raises(ValueError, match=f"guided_{field}"):
        StructuredOutputSpec.from_fields(**fields, prefix="guided_")


def test_spec_is_canonical_and_hashable():
    a = StructuredOutputSpec.from_fields(json={"type": "object", "required": ["x"]})
    b = StructuredOutputSpec.from_fields(json='{"required": ["x"],  "type": "object"}')
    assert a == b and hash(a) == hash(b)
    assert a.schema == {"type": "object", "required": ["x"]}
    assert StructuredOutputSpec.from_fields(json=True).value == "true"
    c = StructuredOutputSpec.from_fields(choice=["x", "y"])
    assert c.kind == "choice" and c.choices == ["x", "y"] and c != a
    assert StructuredOutputSpec.from_fields(json_object=True).kind == "json_object"
    with pytest.raises(ValueError, match="kind"):
        StructuredOutputSpec("yaml", "")


# ---------------------------------------------------------------------------------------------
# Random generation under the constraint, with the default model's tokenizer


@pytest.fixture(scope="module")
def backend(default_tokenizer):
    b = GrammarBackend(default_tokenizer, V)
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def closers(default_tokenizer):
    """bool[V]: tokens that close a string/object/array, and EOS. Random generation picks among
    them half the time, so that random walks end in a few hundred tokens."""
    texts = default_tokenizer.batch_decode([[i] for i in range(len(default_tokenizer))])
    out = np.zeros(V, dtype=bool)
    out[: len(texts)] = [any(c in t for c in '"}]') for t in texts]
    out[default_tokenizer.eos_token_id] = True
    return out


def generate(backend, tokenizer, spec, seed, closers, cap=400, sample=False) -> str:
    """Random logits, masked by the matcher's bitmask (numpy reference), argmax or sampled,
    accepted, until EOS; returns the decoded text (EOS excluded)."""
    rng = np.random.default_rng(seed)
    matcher = backend.compile(spec).result(timeout=30).matcher()
    bitmask = allocate_bitmask(2, V)
    ids: list[int] = []
    for _ in range(cap):
        matcher.fill_bitmask(bitmask, 1)
        logits = rng.standard_normal((2, V)).astype(np.float32) * 3
        if rng.random() < 0.5 and (allowed_tokens(bitmask[1], V) & closers).any():
            logits[1, ~closers] = -np.inf
        masked = ref_apply_bitmask(logits, bitmask)[1]
        assert np.isfinite(masked).any(), "the grammar allowed no token"
        if sample:
            p = np.exp(masked - masked.max())
            token = int(rng.choice(V, p=p / p.sum()))
        else:
            token = int(np.argmax(masked))
        assert matcher.accept_token(token), f"masked argmax {token} was refused"
        if token in backend.eos_token_ids:
            assert matcher.is_terminated()
            return tokenizer.decode(ids)
        ids.append(token)
    pytest.fail(f"no EOS within {cap} tokens: {tokenizer.decode(ids)!r}")


SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {"user": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "address": {
                "type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"], "additionalProperties": False}},
            "required": ["id", "address"]}},
        "required": ["user"],
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "XL"]}},
        "required": ["color", "size"], "additionalProperties": False,
    },
    "array_min_items": {
        "type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 3,
        "maxItems": 5,
    },
    "number_bounds": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99},
                       "score": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
        "required": ["age", "score"], "additionalProperties": False,
    },
    "pattern_no_extra": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                       "ok": {"type": "boolean"}},
        "required": ["code", "ok"], "additionalProperties": False,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", SCHEMAS)
def test_random_generation_satisfies_json_schema(backend, default_tokenizer, closers, name):
    spec = StructuredOutputSpec.from_fields(json=SCHEMAS[name])
    for seed in range(4):
        text = generate(backend, default_tokenizer, spec, seed, closers, sample=seed % 2 == 1)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.parametrize("pattern", [r"\d{4}-(0[1-9]|1[0-2])-\d{2}",
                                     r"[a-z]{1,8}(\.[a-z]{1,5})?@[a-z]{2,8}\.(com|org|net)"])
def test_random_generation_matches_regex(backend, default_tokenizer, closers, pattern):
    spec = StructuredOutputSpec.from_fields(regex=pattern)
    for seed in range(4):
        text = generate(backend, default_tokenizer, spec, seed, closers)
        assert re.fullmatch(pattern, text), text


def test_random_generation_picks_a_choice(backend, default_tokenizer, closers):
    choices = ["positive", "negative", "neutral", "mixed feelings", "café"]
    spec = StructuredOutputSpec.from_fields(choice=choices)
    seen = {generate(backend, default_tokenizer, spec, seed, closers) for seed in range(8)}
    assert seen <= set(choices) and len(seen) >= 2, seen


def test_json_object_gives_an_object(backend, default_tokenizer, closers):
    spec = StructuredOutputSpec.from_fields(json_object=True)
    for seed in range(3):
        assert isinstance(json.loads(generate(backend, default_tokenizer, spec, seed, closers)),
                          dict)


@pytest.mark.parametrize("grammar", [
    'start: expr\nexpr: term ("+" term)*\nterm: NUM | "(" expr ")"\nNUM: /[0-9]{1,3}/\n',
    '?start: expr\n?expr: term ("+" term)*\n?term: /[0-9]/ | "(" expr ")"\n',
    'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9] [0-9]? | "(" expr ")"\n',
], ids=["lark", "lark-inline-rules", "gbnf"])  # fmt: skip
def test_random_generation_follows_grammar(backend, default_tokenizer, closers, grammar):
    spec = StructuredOutputSpec.from_fields(grammar=grammar)
    for seed in range(4):
        text = generate(backend, default_tokenizer, spec, seed, closers)
        assert re.fullmatch(r"[0-9()+]+", text) and text.count("(") == text.count(")"), text
        eval(re.sub(r"\b0+(\d)", r"\1", text), {})  # well formed


def test_eos_allowed_only_when_complete_and_bad_tokens_refused(backend, default_tokenizer):
    eos = default_tokenizer.eos_token_id
    m = backend.compile(StructuredOutputSpec.from_fields(choice=["yes", "no"])).result().matcher()
    bitmask = allocate_bitmask(1, V)
    m.fill_bitmask(bitmask, 0)
    assert not allowed_tokens(bitmask[0], V)[eos]
    assert not m.accept_token(eos) and not m.is_terminated()
    bad = default_tokenizer.encode("maybe")[0]
    assert not m.accept_token(bad)  # refused, and the matcher is still usable
    for t in default_tokenizer.encode("yes"):
        assert m.accept_token(t)
    m.fill_bitmask(bitmask, 0)
    assert np.flatnonzero(allowed_tokens(bitmask[0], V)).tolist() == [eos]
    assert m.is_accepting() and m.accept_token(eos) and m.is_terminated()
    assert not m.accept_token(eos)
    m.fill_bitmask(bitmask, 0)
    assert not bitmask.any()


def test_rollback_restores_the_mask(backend, default_tokenizer):
    m = backend.compile(StructuredOutputSpec.from_fields(json=SCHEMAS["enum"])).result().matcher()
    masks = allocate_bitmask(3, V)
    m.fill_bitmask(masks, 0)
    for t in default_tokenizer.encode('{"color": "re'):
        assert m.accept_token(t)
    m.fill_bitmask(masks, 1)
    m.rollback(m.num_tokens)
    m.fill_bitmask(masks, 2)
    assert (masks[2] == masks[0]).all() and (masks[1] != masks[0]).any()
    with pytest.raises(ValueError, match="roll back"):
        m.rollback(1)


def test_extra_vocab_ids_are_never_allowed_and_fill_bitmasks_matches(default_tokenizer):
    wide = 49152 + 45  # a logits width past the tokenizer, not a multiple of 32
    b = GrammarBackend(default_tokenizer, wide, eos_token_ids=[2, 0])
    try:
        specs = [StructuredOutputSpec.from_fields(json_object=True),
                 StructuredOutputSpec.from_fields(regex=r"[a-z ]+"),
                 StructuredOutputSpec.from_fields(choice=["a", "b"])]
        matchers = [b.compile(s).result().matcher() for s in specs]
        one, par = allocate_bitmask(4, wide), allocate_bitmask(4, wide)
        for row, m in enumerate(matchers):
            m.fill_bitmask(one, row)
        b.fill_bitmasks([(m, row) for row, m in enumerate(matchers)], par)
        assert (one == par).all() and (par[3] == -1).all()
        for row in range(3):
            ok = allowed_tokens(one[row], wide)
            assert ok.any() and not ok[49152:].any()
        assert allowed_tokens(one[2], wide).sum() < allowed_tokens(one[1], wide).sum()
    finally:
        b.shutdown()


# ---------------------------------------------------------------------------------------------
# Bitmask application on device


@pytest.mark.parametrize("vocab", [1, 33, 100, 1000, V])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_bitmask_matches_reference(vocab, dtype):
    rng = np.random.default_rng(vocab)
    B = 4
    logits = rng.standard_normal((B, vocab)).astype(np.float32)
    bitmask = rng.integers(-2**31, 2**31, size=(B, (vocab + 31) // 32), dtype=np.int64)
    bitmask = bitmask.astype(np.int32)
    bitmask[0] = -1  # no constraint
    bitmask[1] = 0  # nothing allowed
    x = jnp.asarray(logits, dtype=dtype)
    out = np.asarray(jax.jit(apply_bitmask)(x, jnp.asarray(bitmask)))
    ref = ref_apply_bitmask(np.asarray(x), bitmask)
    np.testing.assert_array_equal(out, ref)
    assert out[0].tobytes() == np.asarray(x)[0].tobytes()  # bit-identical
    assert np.isneginf(out[1]).all()
    # Every bit counts: token t is kept exactly when its bit is set.
    bits = (bitmask[:, np.arange(vocab) // 32] >> (np.arange(vocab) % 32)) & 1
    np.testing.assert_array_equal(np.isneginf(out), bits == 0)


def test_apply_bitmask_checks_shapes():
    with pytest.raises(ValueError, match="bitmask.shape"):
        apply_bitmask(jnp.zeros((2, 64)), jnp.zeros((2, 3), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Compile pool and cache


def test_cache_compiles_each_spec_once_off_the_calling_thread(backend, monkeypatch):
    threads = []
    build = backend._grammar_text
    monkeypatch.setattr(backend, "_grammar_text",
                        lambda spec: threads.append(threading.get_ident()) or build(spec))
    before = backend.num_compiles
    schema = {"type": "object", "properties": {"cache_test": {"type": "integer"}}}
    a = backend.compile(StructuredOutputSpec.from_fields(json=schema))
    b = backend.compile(StructuredOutputSpec.from_fields(json=json.dumps(schema, indent=2)))
    assert a is b and a.result(timeout=30) is b.result(timeout=30)
    assert backend.num_compiles == before + 1
    c = backend.compile(StructuredOutputSpec.from_fields(regex="cache[0-9]"))
    assert c.result(timeout=30) is not a.result()
    assert backend.num_compiles == before + 2
    assert len(threads) == 2 and threading.get_ident() not in threads


def test_cache_evicts_least_recently_used(default_tokenizer):
    b = GrammarBackend(default_tokenizer, V, cache_size=2)
    try:
        x, y, z = (StructuredOutputSpec.from_fields(regex=r) for r in ("x+", "y+", "z+"))
        fx = b.compile(x)
        b.compile(y)
        assert b.compile(x) is fx  # x is now the most recent
        b.compile(z)  # evicts y
        assert b.compile(x) is fx and b.num_compiles == 3
        b.compile(y).result(timeout=30)
        assert b.num_compiles == 4
    finally:
        b.shutdown()


@pytest.mark.parametrize("fields, message", [
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
    (dict(grammar='root ::= "a" [0-9'), "GBNF"),
    (dict(regex="a(?=b)"), "look"),
    (dict(json={"type": "string", "format": "no-such-format"}), "no-such-format"),
])  # fmt: skip
def test_rejected_grammar_resolves_to_value_error(backend, fields, message):
    future = backend.compile(StructuredOutputSpec.from_fields(**fields))
    with pytest.raises(ValueError, match=message):
        future.result(timeout=30)


# ---------------------------------------------------------------------------------------------
# Tool calling

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"$ref": "#/$defs/unit"}},
        "required": ["city", "unit"], "additionalProperties": False,
        "$defs": {"unit": {"enum": ["C", "F"]}}}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
]  # fmt: skip


def test_tool_choice_required_gives_valid_tool_calls(backend, default_tokenizer, closers):
    spec = tool_call_spec(TOOLS, "required")
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    names = set()
    for seed in range(4):
        calls = json.loads(generate(backend, default_tokenizer, spec, seed, closers))
        assert isinstance(calls, list) and len(calls) >= 1
        for call in calls:
            assert set(call) == {"name", "parameters"}
            jsonschema.validate(call["parameters"], params[call["name"]])
            names.add(call["name"])
    assert names == set(params)


def test_named_tool_choice_gives_its_parameters(backend, default_tokenizer, closers):
    spec = tool_call_spec(TOOLS, {"type": "function", "function": {"name": "add"}})
    for seed in range(3):
        args = json.loads(generate(backend, default_tokenizer, spec, seed, closers))
        jsonschema.validate(args, TOOLS[1]["function"]["parameters"])
    assert tool_call_spec(TOOLS, "auto") is None and tool_call_spec(None, "none") is None
    with pytest.raises(ValueError, match="nope"):
        tool_call_spec(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="at least one tool"):
        tool_call_spec([], "required")


@pytest.mark.parametrize("regex, expected", [
    (r"\d{4}-\d{2}", "[0-9]{4}-[0-9]{2}"), (r"[\d.]+", "[0-9.]+"), (r"\\d", r"\\d"),
    (r"\D\W\w", "[^0-9][^0-9A-Za-z_][0-9A-Za-z_]"), (r"[]\d]", "[]0-9]"), (r"a\.b", r"a\.b"),
])
def test_regex_shorthands_are_ascii(regex, expected):
    from jaxserve.structured_output.backend import ascii_shorthands

    assert ascii_shorthands(regex) == expected


def test_regex_digits_are_ascii_digits(backend, default_tokenizer):
    """`\\d` means 0-9 (as vLLM's default backend and JSON Schema's pattern have it), not any
    script's digits: the tokens of an Arabic-Indic digit are refused."""
    ids = default_tokenizer.encode("\u0663", add_special_tokens=False)
    m = backend.compile(StructuredOutputSpec.from_fields(regex=r"\d+")).result().matcher()
    assert not m.accept_token(ids[0])
    assert m.accept_token(default_tokenizer.encode("7", add_special_tokens=False)[0])


def test_close_objects_refuses_unlisted_keys_everywhere_unless_the_schema_says():
    from jaxserve.structured_output.spec import close_objects

    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "b": {"type": "array", "items": {"properties": {"y": {}}}},
        "c": {"anyOf": [{"type": "object"}, {"type": "string"}]},
        "d": {"type": "object", "additionalProperties": True}},
        "$defs": {"e": {"type": ["object", "null"]}}}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    assert props["a"]["additionalProperties"] is False
    assert props["b"]["items"]["additionalProperties"] is False
    assert props["c"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in props["c"]["anyOf"][1]
    assert props["d"]["additionalProperties"] is True  # the schema said so
    assert closed["$defs"]["e"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is left alone
    jsonschema.Draft202012Validator.check_schema(closed)


@pytest.mark.parametrize("schema, finite", [
    ({"$ref": "#"}, False),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, False),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, False),
    ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, False),
    ({"$defs": {"n": {"allOf": [{"$ref": "#/$defs/n"}]}}, "$ref": "#/$defs/n"}, False),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}}, True),  # a is optional
    ({"type": "array", "items": {"$ref": "#"}}, True),  # [] ends it
    ({"$defs": {"n": {"type": "object", "required": ["next"], "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}}}},
      "$ref": "#/$defs/n"}, True),  # a linked list that ends in null
    ({"$ref": "https://example.com/remote.json"}, True),  # unknown: not refused
], ids=str)
def test_schemas_without_a_finite_instance_are_refused(schema, finite):
    from jaxserve.structured_output.spec import has_finite_instance

    assert has_finite_instance(schema) is finite
    if not finite:
        with pytest.raises(ValueError, match="no finite instance"):
            StructuredOutputSpec.from_fields(json=schema)


def test_library_errors_reach_clients_without_internals():
    from jaxserve.structured_output.backend import library_error

    panic = ("panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10\n"
             "<backtrace>\n   0: <unknown>\n   1: type_call\n")
    assert library_error(panic) == ("the grammar library cannot build it (it is too large or "
                                    "too complex)")
    state = 'lexer error: too many expressions constructed\n<state>\nTokens: ⟦⟧\n"rows": 1'
    assert library_error(state) == "lexer error: too many expressions constructed"
    assert library_error("NoExtensionBias\n<non-verbose/>") == "the grammar allows no text at all"
    assert len(library_error("x" * 10_000)) <= 403


@pytest.mark.parametrize("fields", [
    dict(grammar="root ::= root"), dict(grammar="start: start"), dict(regex="a{1000000}")],
    ids=str)
def test_grammars_no_text_can_start_are_rejected_at_compile(backend, fields):
    future = backend.compile(StructuredOutputSpec.from_fields(**fields))
    with pytest.raises(ValueError, match="no output can satisfy it") as e:
        future.result(timeout=120)
    assert "<state>" not in str(e.value) and "panic" not in str(e.value)


def test_choices_are_bounded():
    from jaxserve.structured_output.spec import MAX_CHOICES

    StructuredOutputSpec.from_fields(choice=[str(i) for i in range(MAX_CHOICES)])
    with pytest.raises(ValueError, match="at most"):
        StructuredOutputSpec.from_fields(choice=[str(i) for i in range(MAX_CHOICES + 1)])
