"""What a request constrains its output to: one validated, canonical, hashable spec.

`StructuredOutputSpec.from_fields` takes vLLM's fields (`json`, `regex`, `choice`, `grammar`,
`json_object`, as in `structured_outputs` or the older `guided_*` names) and checks them before
anything is compiled, raising `ValueError` that names the field. `tool_call_spec` builds the spec
that forces OpenAI tool calls for `tool_choice="required"` or a named tool, as vLLM does.

Specs are frozen and compare by (kind, value), so they key the backend's compiled-grammar cache:
the same schema written with different key order or spacing compiles once.
"""

from __future__ import annotations

import json as _json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
# More alternatives than this take the grammar library seconds to compile, and past ~65k it fails.
MAX_CHOICES = 10_000
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputSpec:
    """One output constraint.

    kind:  "json" (a JSON Schema), "json_object" (any JSON object), "regex", "choice" (one of a
           list of strings) or "grammar" (a context-free grammar in Lark or GBNF syntax).
    value: canonical text: the schema dumped with sorted keys and no spaces, the regex or grammar
           as given, the choices as a JSON list, "" for json_object.
    """

    kind: Kind
    value: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind={self.kind!r} is not one of {KINDS}")

    @classmethod
    def from_fields(
        cls, *, json: Any = None, regex: str | None = None, choice: Sequence[str] | None = None,
        grammar: str | None = None, json_object: bool = False, prefix: str = "",
    ) -> StructuredOutputSpec:  # fmt: skip
        """Validate vLLM's structured-output fields; exactly one must be set.

        `json` is a schema (dict or bool) or its JSON text, checked against the JSON Schema
        Draft 2020-12 metaschema. `regex` must compile (Python syntax is the check; the grammar
        library's own limits, such as no look-around, surface at compile time). `choice` is a
        non-empty list of strings. `prefix` is prepended to field names in error messages
        (e.g. "guided_" or "structured_outputs.").
        """
        given = {
            "json": json is not None, "regex": regex is not None, "choice": choice is not None,
            "grammar": grammar is not None, "json_object": bool(json_object),
        }  # fmt: skip
        names = [k for k, v in given.items() if v]
        if len(names) != 1:
            fields = ", ".join(prefix + k for k in given)
            raise ValueError(f"exactly one structured output constraint must be set (one of "
                             f"{fields}); got {[prefix + k for k in names] or 'none'}")
        if json is not None:
            return cls("json", canonical_schema(json, field=prefix + "json"))
        if json_object:
            return cls("json_object", "")
        if regex is not None:
            if not isinstance(regex, str):
                raise ValueError(f"{prefix}regex must be a string, got {type(regex).__name__}")
            try:
                re.compile(regex)
            except re.error as e:
                raise ValueError(f"{prefix}regex={regex!r} does not compile: {e}") from None
            return cls("regex", regex)
        if choice is not None:
            if isinstance(choice, str | bytes) or not isinstance(choice, Sequence) or not choice:
                raise ValueError(f"{prefix}choice must be a non-empty list of strings, "
                                 f"got {choice!r}")
            bad = [c for c in choice if not isinstance(c, str)]
            if bad:
                raise ValueError(f"{prefix}choice must hold only strings, got {bad[0]!r}")
            if len(choice) > MAX_CHOICES:
                raise ValueError(f"{prefix}choice holds {len(choice)} strings; at most "
                                 f"{MAX_CHOICES} are allowed")
            return cls("choice", _json.dumps(list(choice), ensure_ascii=False))
        if not isinstance(grammar, str) or not grammar.strip():
            raise ValueError(f"{prefix}grammar must be a non-empty string (Lark or GBNF)")
        return cls("grammar", grammar)

    @property
    def schema(self) -> Any:
        """The JSON Schema of a "json" spec, parsed."""
        if self.kind != "json":
            raise ValueError(f"kind={self.kind!r} has no schema")
        return _json.loads(self.value)

    @property
    def choices(self) -> list[str]:
        """The strings of a "choice" spec."""
        if self.kind != "choice":
            raise ValueError(f"kind={self.kind!r} has no choices")
        return _json.loads(self.value)


def canonical_schema(schema: Any, *, field: str = "json") -> str:
    """Parse (if text) and check a JSON Schema; return it dumped with sorted keys."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if isinstance(schema, str | bytes):
        try:
            schema = _json.loads(schema)
        except ValueError as e:
            raise ValueError(f"{field} is not valid JSON: {e}") from None
    if not isinstance(schema, dict | bool):
        raise ValueError(f"{field} must be a JSON Schema object or boolean, "
                         f"got {type(schema).__name__}")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"{field} is not a valid JSON Schema at {where}: {e.message}") from None
    except RecursionError:
        raise ValueError(f"{field} is nested too deeply") from None
    if not has_finite_instance(schema):
        raise ValueError(f"{field} has no finite instance: it requires itself (through $ref) "
                         "with no way out, or requires a false schema; give the recursion a "
                         "base case (an optional property, an empty array, an anyOf branch)")
    return _json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _local_ref(root: Any, ref: str) -> Any:
    """The subschema a local `$ref` ("#", "#/$defs/x", ...) points to; None when unknown."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _children(node: dict) -> list[Any]:
    out = []
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            out += node[key]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out += node[key].values()
    for key in (*_SUBSCHEMAS, "additionalProperties"):
        if isinstance(node.get(key), dict | bool):
            out.append(node[key])
    return out


def has_finite_instance(schema: Any) -> bool:
    """False when no finite JSON value can satisfy `schema` because what it requires recurses
    with no way out (`{"$ref": "#"}`, a required property that is the schema itself) or is
    `false`. Conservative: keywords it does not model count as satisfiable, so True is not a
    proof. Solved as a least fixpoint over the schema's nodes, without recursion."""
    nodes: dict[int, Any] = {}
    stack = [schema]
    while stack:
        node = stack.pop()
        if id(node) in nodes or not isinstance(node, dict | bool):
            continue
        nodes[id(node)] = node
        if isinstance(node, dict):
            stack += _children(node)
            if isinstance(node.get("$ref"), str):
                target = _local_ref(schema, node["$ref"])
                if target is not None:
                    stack.append(target)
    ok = dict.fromkeys(nodes, False)

    def satisfiable(sub: Any) -> bool:
        return ok.get(id(sub), True) if isinstance(sub, dict | bool) else True

    def evaluate(node: Any) -> bool:
        if isinstance(node, bool):
            return node
        if isinstance(node.get("$ref"), str):
            target = _local_ref(schema, node["$ref"])
            if target is not None and not satisfiable(target):
                return False
        if isinstance(node.get("allOf"), list) and not all(map(satisfiable, node["allOf"])):
            return False
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and node[key] and not any(
                    map(satisfiable, node[key])):
                return False
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        for name in node.get("required") or []:
            if name in props and not satisfiable(props[name]):
                return False
        min_items = node.get("minItems", 0)
        if isinstance(min_items, int) and min_items > 0:
            prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else []
            if not all(map(satisfiable, prefix[:min_items])):
                return False
            if min_items > len(prefix) and not satisfiable(node.get("items", True)):
                return False
        return True

    changed = True
    while changed:
        changed = False
        for key, node in nodes.items():
            if not ok[key] and evaluate(node):
                ok[key] = changed = True
    return satisfiable(schema)


def tool_call_spec(tools: Sequence[Any] | None, tool_choice: Any) -> StructuredOutputSpec | None:
    """The constraint that forces tool calls, or None when `tool_choice` forces nothing.

    tool_choice="required": a JSON array (at least one item) of {"name": N, "parameters": P},
    each item one of the tools: an anyOf over tools, N that tool's name and P its parameters
    schema (as vLLM builds it, plus additionalProperties: false on each item, so no stray keys).
    `$defs` of the tools' parameters are hoisted to the top, so `#/$defs/...` refs keep
    resolving; two tools defining the same name differently is a ValueError.
    tool_choice={"type": "function", "function": {"name": N}}: that tool's parameters schema
    (the output is the arguments object itself).
    Either way the arguments are strict, as vLLM's: every object in a tool's parameters that
    does not say otherwise gets `additionalProperties: false` (`close_objects`), so no argument
    key the tool never declared is generated.
    "auto", "none" or None: None.

    `tools` are OpenAI tool objects: mappings (or pydantic models) with "type": "function" and
    "function": {"name", "parameters"?}; missing parameters mean an object with any properties.
    """
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    by_name = {name: params for name, params in _tool_parameters(tools)}
    if tool_choice == "required":
        if not by_name:
            raise ValueError('tool_choice="required" needs at least one tool in tools')
        defs: dict[str, Any] = {}
        items = []
        for name, params in by_name.items():
            params = dict(params)
            for k, v in params.pop("$defs", {}).items():
                v = close_objects(v)
                if k in defs and defs[k] != v:
                    raise ValueError(f"tools: $defs {k!r} is defined differently by two tools")
                defs[k] = v
            items.append({
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]},
                               "parameters": close_objects(params)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            })  # fmt: skip
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if defs:
            schema["$defs"] = defs
        return StructuredOutputSpec.from_fields(json=schema, prefix="tools.")
    choice = _as_dict(tool_choice)
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError(f'tool_choice must be "none", "auto", "required" or '
                         f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}')
    if name not in by_name:
        raise ValueError(f"tool_choice names function {name!r}, which is not in tools "
                         f"({sorted(by_name)})")
    return StructuredOutputSpec.from_fields(json=close_objects(by_name[name]),
                                            prefix=f"tools[{name}].")


def _as_dict(x: Any) -> Any:
    if hasattr(x, "model_dump"):
        return x.model_dump(exclude_none=True)
    return dict(x) if isinstance(x, Mapping) else x


def _tool_parameters(tools: Sequence[Any] | None) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i, tool in enumerate(tools or ()):
        tool = _as_dict(tool)
        fn = _as_dict(tool.get("function")) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': "
                             f"{{'name': ..., 'parameters': ...}}}}")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON Schema object")
        out.append((fn["name"], params))
    return out


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMAS = ("items", "not", "if", "then", "else", "contains", "additionalItems")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema that does not say otherwise has
    `additionalProperties: false` (vLLM's `disable_additional_properties`: keys outside
    `properties` are refused, as xgrammar does by default)."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(s) for k, s in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    is_object = out.get("type") == "object" or (
        isinstance(out.get("type"), list) and "object" in out["type"]) or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
