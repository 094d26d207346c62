"""The JSON of an output record, generated from the model that documents it.

An output model (``WindowResult``, ``Alert``) declares its fields once, in the order
its JSON object has them; the hot paths do not build the model (a Faust Record costs
tens of µs to construct) but encode from what is derived here from its field list,
once, when they start:

* :func:`object_builder`: a function taking the fields as keyword arguments and
  returning the JSON object as a dict in field order (what orjson encodes), as cheap
  as a dict literal;
* :func:`json_template`: the model's compact JSON with fixed values encoded and the
  rest left as ``%``-placeholders (:class:`Slot`), filled in with ``%`` per record.

A field added to, removed from or reordered in the model changes the bytes of every
writer, and a writer that names a field the model lacks (or misses one) fails when it
is built, not by producing other JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson


def fields_of(model: type) -> tuple[str, ...]:
    """The fields the model declares itself, in declaration order: its JSON's keys."""
    return tuple(model.__dict__.get("__annotations__", {}))


def to_json_dict(record: Any) -> dict[str, Any]:
    """The JSON object of a model instance (its fields, in order)."""
    return {name: getattr(record, name) for name in fields_of(type(record))}


def object_builder(model: type) -> Callable[..., dict[str, Any]]:
    """``build(**fields) -> dict`` for the model's fields (all required, by keyword),
    in the model's order. Generated source, like ``dataclasses``' ``__init__``: a dict
    display costs what the hand-written one did."""
    names = fields_of(model)
    if not all(name.isidentifier() for name in names):
        raise ValueError(f"{model.__name__}: field names must be identifiers: {names}")
    args = ", ".join(names)
    body = ", ".join(f"{name!r}: {name}" for name in names)
    namespace: dict[str, Any] = {}
    exec(f"def build(*, {args}):\n    return {{{body}}}\n", namespace)  # noqa: S102 - names checked above
    build = namespace["build"]
    build.__qualname__ = build.__name__ = f"{model.__name__}_object"
    build.__doc__ = f"The JSON object of one {model.__name__} (fields {', '.join(names)})."
    return build


class Slot:
    """A placeholder in a :func:`json_template`: ``%b`` for JSON bytes made per record,
    ``%d`` for an int."""

    __slots__ = ("spec",)

    def __init__(self, spec: bytes) -> None:
        self.spec = spec


JSON = Slot(b"%b")
INT = Slot(b"%d")


def json_template(model: type, **values: Any) -> bytes:
    """The model's compact JSON (orjson's form) with each field's value encoded, or a
    placeholder where the value is a :class:`Slot`. Every field must be given."""
    names = fields_of(model)
    if set(values) != set(names):
        missing, extra = sorted(set(names) - set(values)), sorted(set(values) - set(names))
        raise TypeError(f"{model.__name__} template: missing {missing}, unknown {extra}")
    parts = []
    for name in names:
        value = values[name]
        raw = value.spec if isinstance(value, Slot) else orjson.dumps(value).replace(b"%", b"%%")
        parts.append(orjson.dumps(name) + b":" + raw)
    return b"{" + b",".join(parts) + b"}"


__all__ = ["INT", "JSON", "Slot", "fields_of", "json_template", "object_builder", "to_json_dict"]
