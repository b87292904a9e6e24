"""Local ``$ref``s of a JSON Schema, before it becomes a grammar: refusing recursion with no way out,
and moving a schema (refs and all) to another place in a bigger one.

Why the check: llguidance compiles a schema whose ``$ref`` can only ever contain itself
(``{"$ref": "#"}``, ``$defs`` a -> b -> a, a required property holding its own object) without complaint,
but no finished value exists, so decoding walks into that part and stops with half a value and
finish_reason "stop". A recursion with a base case (an optional property, an empty array, null in an
anyOf) is fine and kept. ``unending_ref`` finds the first ref no finite value can fill: the least
fixpoint of "this ref's target can end", computed over the refs reachable from the root."""

from __future__ import annotations

from urllib.parse import unquote

# keywords whose values are data, not schemas: a "$ref" key inside them is not a reference
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})
_DEFS_KEYWORDS = ("$defs", "definitions")


def unending_ref(schema) -> str | None:
    """The first local ``$ref`` (reachable from the root) whose target holds no finite value, or None."""
    refs: list[str] = []
    targets: dict[str, object] = {}

    def collect(node) -> None:
        for ref in _refs_in(node):
            if ref in targets:
                continue
            target = resolve(schema, ref)
            if target is _MISSING:
                continue  # llguidance reports a ref that points nowhere itself
            refs.append(ref)
            targets[ref] = target
            collect(target)

    collect(schema)
    ends = dict.fromkeys(refs, False)
    changed = True
    while changed:  # each pass can only turn refs to True: at most len(refs) passes
        changed = False
        for ref in refs:
            if not ends[ref] and _can_end(targets[ref], ends):
                ends[ref], changed = True, True
    return next((ref for ref in refs if not ends[ref]), None)


def rebase_refs(schema, pointer: str):
    """``schema`` rewritten to live at JSON pointer ``pointer`` (e.g. "/$defs/tool_0") of a bigger
    document: its local refs ("#", "#/...") point to the same places under ``pointer``. Anchors ("#name")
    and other documents' refs are left as they are."""
    if isinstance(schema, list):
        return [rebase_refs(item, pointer) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = "#" + pointer + value[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = value
        elif key == "properties" and isinstance(value, dict):  # names there are data, their values schemas
            out[key] = {name: rebase_refs(sub, pointer) for name, sub in value.items()}
        else:
            out[key] = rebase_refs(value, pointer)
    return out


_MISSING = object()


def resolve(document, ref: str):
    """The part of ``document`` a local ref ("#", "#/a/b", with ~0, ~1 and %-escapes) names, or ``_MISSING``."""
    if ref == "#":
        return document
    if not ref.startswith("#/"):
        return _MISSING
    node = document
    for step in ref[2:].split("/"):
        step = unquote(step).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            return _MISSING
    return node


def _refs_in(node):
    """The local refs in ``node``'s schema positions, not descending into $defs (reached through refs)."""
    if isinstance(node, list):
        for item in node:
            yield from _refs_in(item)
        return
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        yield ref
    for key, value in node.items():
        if key in _DATA_KEYWORDS or key in _DEFS_KEYWORDS or key == "$ref":
            continue
        if key == "properties" and isinstance(value, dict):
            for sub in value.values():
                yield from _refs_in(sub)
        elif isinstance(value, (dict, list)):
            yield from _refs_in(value)


def _can_end(node, ends: dict[str, bool]) -> bool:
    """Whether some finite JSON value can satisfy ``node``, taking each ref's answer from ``ends``.
    Generous wherever unsure (a conflict between keywords is llguidance's to report)."""
    if isinstance(node, bool):
        return node
    if not isinstance(node, dict):
        return True
    ref = node.get("$ref")
    if isinstance(ref, str) and not ends.get(ref, True):
        return False
    if not all(_can_end(sub, ends) for sub in _list(node.get("allOf"))):
        return False
    for key in ("anyOf", "oneOf"):
        branches = _list(node.get(key))
        if branches and not any(_can_end(sub, ends) for sub in branches):
            return False
    if "const" in node or "enum" in node:
        return True
    types = node.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else None
    if types is None or any(t not in ("object", "array") for t in types):
        return True  # a number, string, boolean or null ends at once
    return ("object" in types and _object_can_end(node, ends)) or ("array" in types and _array_can_end(node, ends))


def _object_can_end(node: dict, ends: dict[str, bool]) -> bool:
    properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    extra = node.get("additionalProperties", True)
    if node.get("patternProperties"):
        extra = True  # which pattern a required name falls under is not worked out here
    return all(_can_end(properties.get(name, extra), ends) for name in _list(node.get("required")) if
               isinstance(name, str))


def _array_can_end(node: dict, ends: dict[str, bool]) -> bool:
    least = node.get("minItems", 0)
    least = least if isinstance(least, int) else 0
    prefix = _list(node.get("prefixItems"))
    items = node.get("items", True)
    needed = prefix[:least] + ([items] if least > len(prefix) else [])  # later items share one schema
    return all(_can_end(sub, ends) for sub in needed)


def _list(value) -> list:
    return value if isinstance(value, list) else []
