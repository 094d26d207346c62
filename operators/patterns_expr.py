"""A minimal safe condition language, used by pattern definitions only when the
project's expression language (``operators/expr.py``) is not available.

Python-like syntax, evaluated by walking a whitelisted AST (never ``eval``):
comparisons (``== != < <= > >= in not in``), ``and`` / ``or`` / ``not``, arithmetic
(``+ - * / %``), literals (numbers, strings, true/false/null, lists), field names and
dotted paths (``match.fail.country``). A missing field is ``null``; a comparison that
cannot be made (``null > 3``) is false instead of an error, so one odd event never
stops a stream.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from typing import Any


class ExprError(ValueError):
    """The condition text is not valid."""


_CMP = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Mod: operator.mod}
_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class _Missing(Exception):
    pass


class Expr:
    """A compiled condition; ``evaluate(record)`` returns its value."""

    def __init__(self, text: str, tree: ast.AST) -> None:
        self.text = text
        self._tree = tree

    def evaluate(self, record: Mapping[str, Any]) -> Any:
        try:
            return _eval(self._tree, record)
        except (TypeError, ZeroDivisionError, _Missing):
            return None


def _path(node: ast.AST) -> list[str] | None:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        base = _path(node.value)
        return None if base is None else [*base, node.attr]
    return None


def _lookup(record: Mapping[str, Any], path: list[str]) -> Any:
    value: Any = record
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _eval(node: ast.AST, record: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body, record)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    path = _path(node)
    if path is not None:
        return _lookup(record, path)
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(bool(_eval(v, record)) for v in node.values)
        return any(bool(_eval(v, record)) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, record)
        if isinstance(node.op, ast.Not):
            return not value
        if isinstance(node.op, ast.USub):
            return -value
        return value
    if isinstance(node, ast.BinOp):
        return _BIN[type(node.op)](_eval(node.left, record), _eval(node.right, record))
    if isinstance(node, ast.Compare):
        left = _eval(node.left, record)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _eval(comparator, record)
            try:
                if not _CMP[type(op)](left, right):
                    return False
            except TypeError:
                return False
            left = right
        return True
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, record) for e in node.elts]
    raise _Missing()


_ALLOWED = (ast.Expression, ast.Constant, ast.Name, ast.Attribute, ast.BoolOp, ast.And, ast.Or,
            ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.BinOp, ast.Compare, ast.List, ast.Tuple,
            ast.Load, *_CMP, *_BIN)


def compile_expr(text: str) -> Expr:
    """Parse and check a condition; raises ExprError naming what is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ExprError("a condition must be a non-empty string")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"syntax error in {text!r}: {exc.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ExprError(f"{type(node).__name__} is not allowed in a condition: {text!r}")
    return Expr(text, tree)


__all__ = ["Expr", "ExprError", "compile_expr"]
