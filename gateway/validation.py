"""Checking a parsed request body against its declared model, with a clear 400.

The models (``corral.gateway.ollama_schema``, ``corral.gateway.openai_schema``) are
``msgspec`` Structs: ``msgspec.convert`` checks a body already parsed by the gateway in
about a microsecond, and nothing is reshaped, so what is forwarded is what was sent.
msgspec words its errors for programmers (``Expected `int | null`, got `str` - at
`$.options.num_predict```); ``explain`` rewords them the way Corral's other refusals
read: the field, what it must be, and what it was.
"""

from __future__ import annotations

import functools
import re
from enum import Enum
from typing import Any, TypeVar

import msgspec
from msgspec import inspect

from corral.errors import BadRequest

Model = TypeVar("Model", bound=msgspec.Struct)

_AT = re.compile(r"(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
_EXPECTED = re.compile(r"Expected `(?P<types>[^`]+)`(?:, got `(?P<got>[^`]+)`| (?P<rule>.+))?")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_VALUE = re.compile(r"Invalid (?:enum )?value (?P<value>.+)")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")

_TYPES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
}

_GOT = {"float": "a float"}  # "expected an integer, got a number" would puzzle


def check(model: type[Model], body: dict[str, Any], at: str = "") -> Model:
    """``body`` as ``model``, or a ``BadRequest`` naming the field; ``at`` is where the
    body sits in the request (``"request"`` inside ``POST /jobs``)."""
    try:
        return msgspec.convert(body, model)
    except msgspec.ValidationError as exc:
        raise BadRequest(explain(str(exc), model, at)) from exc


def explain(message: str, model: type[msgspec.Struct], at: str = "") -> str:
    """msgspec's validation message for ``model``, reworded; unknown shapes kept as sent."""
    found = _AT.fullmatch(message)
    what, path = (found["what"], found["path"] or "") if found else (message, "")
    field = _join(at, path)
    if missing := _MISSING.fullmatch(what):
        return f"{_join(field, '.' + missing['field'])} is required"
    where = f"invalid {field!r}" if field else "invalid request body"
    if expected := _EXPECTED.fullmatch(what):
        wanted = _kinds(expected["types"])
        if expected["got"]:
            got = expected["got"]
            return f"{where}: expected {wanted}, got {_GOT.get(got) or _TYPES.get(got, got)}"
        return f"{where}: expected {wanted} {expected['rule']}"
    if value := _VALUE.fullmatch(what):
        choices = _choices(model, path)
        if choices:
            return f"{where}: expected one of {', '.join(choices)}, got {value['value']}"
        return f"{where}: unsupported value {value['value']}"
    return f"{where}: {what}"


def _join(at: str, path: str) -> str:
    if not at:
        return path.removeprefix(".")
    return at + path if path else at


def _kinds(types: str) -> str:
    """``int | float | null`` as "a number": what the field may be, in words."""
    names = [name for name in types.split(" | ") if name != "null"] or ["null"]
    if "int" in names and "float" in names:
        names.remove("int")
    return " or ".join(_TYPES.get(name, name) for name in names)


def _choices(model: type[msgspec.Struct], path: str) -> list[str]:
    """The allowed values at ``path`` (an enum, a literal or a union's tags), quoted."""
    nodes: list[inspect.Type] = [_info(model)]
    for name, index in _STEP.findall(path):
        nodes = [child for node in _flat(nodes) for child in _children(node, name, index)]
    values: list[Any] = []
    for node in _flat(nodes):
        if isinstance(node, inspect.LiteralType):
            values.extend(node.values)
        elif isinstance(node, inspect.EnumType):
            values.extend(member.value for member in node.cls)
    return [repr(v.value if isinstance(v, Enum) else v) for v in values]


@functools.cache
def _info(model: type[msgspec.Struct]) -> inspect.Type:
    return inspect.type_info(model)


def _flat(nodes: list[inspect.Type]) -> list[inspect.Type]:
    out: list[inspect.Type] = []
    for node in nodes:
        if isinstance(node, inspect.UnionType):
            out.extend(_flat(list(node.types)))
        else:
            out.append(node)
    return out


def _children(node: inspect.Type, name: str, index: str) -> list[inspect.Type]:
    if index and isinstance(node, inspect.ListType):
        return [node.item_type]
    if name and isinstance(node, inspect.StructType):
        if name == node.tag_field:
            return [inspect.LiteralType(values=(node.tag,))]
        return [field.type for field in node.fields if field.encode_name == name]
    return []
