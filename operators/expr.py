"""The safe expression language of filters, computed fields and pattern conditions.

    value > 10 and action == 'click'
    lower(trim(country)) in ['de', 'at'] and not exists(refund)
    user.tier == "gold" or amount * 1.2 >= limit

A small hand-written tokenizer and precedence-climbing parser build a tree of plain
tuples; the evaluator walks that tree. Nothing is ever handed to Python's ``eval`` or
``compile``, there is no attribute access (a dotted name reads nested *mapping keys*
only), and the only callables are the whitelisted functions in ``FUNCTIONS``. Input
size, nesting depth and string growth are bounded, so hostile text is refused at
compile time and hostile data fails one record, never the worker.

Semantics: a missing field is ``null``; ordering comparisons with ``null`` or between
incompatible types are false (one odd record must not stop a stream); arithmetic on
wrong types or division by zero raises ``EvalError`` for that record.
"""

from __future__ import annotations

import math
import operator
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

MAX_LENGTH = 4096  # characters of expression text
MAX_TOKENS = 1024
MAX_DEPTH = 32  # nesting of parentheses / operators / calls
MAX_STRING = 1 << 20  # longest string an expression may build (bytes, roughly)
MAX_LIST = 1000  # longest list literal


class ExprError(ValueError):
    """The expression text is not valid (raised by ``compile_expr``)."""


class EvalError(ExprError):
    """The expression cannot be evaluated on this record (wrong types, ÷0, too big)."""


# ---------------------------------------------------------------- tokenizer

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<number>\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)?)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op>==|!=|<=|>=|<|>|\+|-|\*|/|%|\(|\)|\[|\]|,)
    """,
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "'": "'", '"': '"'}
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def tokenize(text: str) -> list[tuple[str, Any]]:
    """Split expression text into (kind, value) tokens; ExprError on anything else."""
    tokens: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExprError(f"unexpected character {text[pos]!r} at position {pos}")
        pos = m.end()
        kind = m.lastgroup
        raw = m.group()
        if kind == "ws":
            continue
        if kind == "number":
            tokens.append(("num", float(raw) if any(c in raw for c in ".eE") else int(raw)))
        elif kind == "string":
            tokens.append(("str", _unescape(raw[1:-1])))
        elif kind == "name":
            if raw in _KEYWORDS:
                tokens.append(("kw", raw))
            elif "." not in raw and raw in ("True", "False", "None"):
                # Python spellings are accepted as literals; users paste them.
                tokens.append(("kw", {"True": "true", "False": "false", "None": "null"}[raw]))
            else:
                tokens.append(("name", raw))
        else:
            tokens.append(("op", raw))
        if len(tokens) > MAX_TOKENS:
            raise ExprError(f"expression has more than {MAX_TOKENS} tokens")
    return tokens


# ---------------------------------------------------------------- parser
# Tree nodes are tuples: ("lit", v) ("field", path) ("not", x) ("neg", x)
# ("and", a, b) ("or", a, b) ("cmp", op, a, b) ("in", a, b, negated)
# ("bin", op, a, b) ("call", name, args) ("list", items)

_BINARY_PRECEDENCE = {"*": 6, "/": 6, "%": 6, "+": 5, "-": 5}
_COMPARISONS = {"==", "!=", "<", "<=", ">", ">="}


class _Parser:
    def __init__(self, tokens: list[tuple[str, Any]]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self, offset: int = 0) -> tuple[str, Any] | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def take(self) -> tuple[str, Any]:
        tok = self.peek()
        if tok is None:
            raise ExprError("unexpected end of expression")
        self.pos += 1
        return tok

    def expect(self, kind: str, value: Any) -> None:
        tok = self.take()
        if tok != (kind, value):
            raise ExprError(f"expected {value!r}, found {tok[1]!r}")

    def at(self, kind: str, value: Any) -> bool:
        return self.peek() == (kind, value)

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError(f"expression nests deeper than {MAX_DEPTH} levels")

    def parse(self) -> tuple:
        if not self.tokens:
            raise ExprError("empty expression")
        tree = self.or_expr()
        if self.peek() is not None:
            raise ExprError(f"unexpected {self.peek()[1]!r} after a complete expression")
        return tree

    def or_expr(self) -> tuple:
        left = self.and_expr()
        while self.at("kw", "or"):
            self.take()
            left = ("or", left, self.and_expr())
        return left

    def and_expr(self) -> tuple:
        left = self.not_expr()
        while self.at("kw", "and"):
            self.take()
            left = ("and", left, self.not_expr())
        return left

    def not_expr(self) -> tuple:
        if self.at("kw", "not"):
            self.take()
            self.nested()
            node = ("not", self.not_expr())
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> tuple:
        left = self.arith(0)
        tok = self.peek()
        if tok is not None and tok[0] == "op" and tok[1] in _COMPARISONS:
            self.take()
            return ("cmp", tok[1], left, self.arith(0))
        if self.at("kw", "in"):
            self.take()
            return ("in", left, self.arith(0), False)
        if self.at("kw", "not") and self.peek(1) == ("kw", "in"):
            self.take()
            self.take()
            return ("in", left, self.arith(0), True)
        return left

    def arith(self, min_prec: int) -> tuple:
        left = self.unary()
        while True:
            tok = self.peek()
            if tok is None or tok[0] != "op" or tok[1] not in _BINARY_PRECEDENCE:
                return left
            prec = _BINARY_PRECEDENCE[tok[1]]
            if prec < min_prec:
                return left
            self.take()
            left = ("bin", tok[1], left, self.arith(prec + 1))

    def unary(self) -> tuple:
        if self.at("op", "-"):
            self.take()
            self.nested()
            node = ("neg", self.unary())
            self.depth -= 1
            return node
        if self.at("op", "+"):
            self.take()
            return self.unary()
        return self.atom()

    def atom(self) -> tuple:
        kind, value = self.take()
        if kind in ("num", "str"):
            return ("lit", value)
        if kind == "kw":
            if value in ("true", "false", "null"):
                return ("lit", {"true": True, "false": False, "null": None}[value])
            raise ExprError(f"unexpected keyword {value!r}")
        if kind == "name":
            if self.at("op", "("):
                return self.call(value)
            return ("field", tuple(value.split(".")))
        if (kind, value) == ("op", "("):
            self.nested()
            inner = self.or_expr()
            self.expect("op", ")")
            self.depth -= 1
            return inner
        if (kind, value) == ("op", "["):
            self.nested()
            items = []
            if not self.at("op", "]"):
                items.append(self.or_expr())
                while self.at("op", ","):
                    self.take()
                    items.append(self.or_expr())
                    if len(items) > MAX_LIST:
                        raise ExprError(f"list literal longer than {MAX_LIST}")
            self.expect("op", "]")
            self.depth -= 1
            return ("list", tuple(items))
        raise ExprError(f"unexpected {value!r}")

    def call(self, name: str) -> tuple:
        if name not in FUNCTIONS:
            raise ExprError(
                f"unknown function {name!r}; allowed: {', '.join(sorted(FUNCTIONS))}"
            )
        self.expect("op", "(")
        self.nested()
        args = []
        if not self.at("op", ")"):
            args.append(self.or_expr())
            while self.at("op", ","):
                self.take()
                args.append(self.or_expr())
        self.expect("op", ")")
        self.depth -= 1
        lo, hi = FUNCTIONS[name][1]
        if not lo <= len(args) <= hi:
            raise ExprError(f"{name}() takes {lo}..{hi} arguments, got {len(args)}")
        if name == "exists" and (args[0][0] != "field"):
            raise ExprError("exists() takes a field name, e.g. exists(user.email)")
        return ("call", name, tuple(args))


# ---------------------------------------------------------------- functions


def _str_arg(value: Any, fn: str) -> str:
    if not isinstance(value, str):
        raise EvalError(f"{fn}() needs a string, got {type(value).__name__}")
    return value


def _capped(s: str) -> str:
    if len(s) > MAX_STRING:
        raise EvalError(f"string result longer than {MAX_STRING} characters")
    return s


def _num(value: Any, fn: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvalError(f"{fn}() needs a number, got {type(value).__name__}")
    return value


def _to_number(value: Any, kind: type) -> Any:
    try:
        result = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise EvalError(f"cannot convert {value!r} to {kind.__name__}") from None
    if isinstance(result, float) and not math.isfinite(result):
        raise EvalError(f"{value!r} is not a finite number")
    return result


#: name -> (implementation, (min args, max args)). ``exists`` is handled by the evaluator.
FUNCTIONS: dict[str, tuple[Callable[..., Any] | None, tuple[int, int]]] = {
    "exists": (None, (1, 1)),
    "lower": (lambda s: _str_arg(s, "lower").lower(), (1, 1)),
    "upper": (lambda s: _str_arg(s, "upper").upper(), (1, 1)),
    "trim": (lambda s: _str_arg(s, "trim").strip(), (1, 1)),
    "len": (lambda v: len(v) if isinstance(v, (str, list, dict)) else _fail_len(v), (1, 1)),
    "contains": (lambda s, sub: _str_arg(sub, "contains") in _str_arg(s, "contains"), (2, 2)),
    "startswith": (lambda s, p: _str_arg(s, "startswith").startswith(_str_arg(p, "startswith")), (2, 2)),
    "endswith": (lambda s, p: _str_arg(s, "endswith").endswith(_str_arg(p, "endswith")), (2, 2)),
    "concat": (lambda *xs: _capped("".join("" if x is None else str(x) for x in xs)), (1, 16)),
    "substr": (lambda s, a, b=None: _str_arg(s, "substr")[int(_num(a, "substr")): None if b is None else int(_num(b, "substr"))], (2, 3)),
    "replace": (lambda s, a, b: _capped(_str_arg(s, "replace").replace(_str_arg(a, "replace"), _str_arg(b, "replace"))), (3, 3)),
    "str": (lambda v: _capped(str(v)) if v is not None else None, (1, 1)),
    "int": (lambda v: _to_number(v, int) if not isinstance(v, float) else int(v), (1, 1)),
    "float": (lambda v: _to_number(v, float), (1, 1)),
    "abs": (lambda v: abs(_num(v, "abs")), (1, 1)),
    "round": (lambda v, n=0: round(_num(v, "round"), int(_num(n, "round"))), (1, 2)),
    "min": (lambda *xs: min(_num(x, "min") for x in xs), (1, 16)),
    "max": (lambda *xs: max(_num(x, "max") for x in xs), (1, 16)),
    "coalesce": (lambda *xs: next((x for x in xs if x is not None), None), (1, 16)),
    "now": (lambda: time.time(), (0, 0)),
}


def _fail_len(v: Any) -> int:
    raise EvalError(f"len() needs a string, list or object, got {type(v).__name__}")


# ---------------------------------------------------------------- evaluator

_MISSING = object()


def lookup(record: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a dotted path of nested mappings, or ``_MISSING``."""
    value: Any = record
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if a is None or b is None or isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        if op == "<":
            return a < b
        if op == "<=":
            return a <= b
        if op == ">":
            return a > b
        return a >= b
    except TypeError:
        return False


def _arith(op: str, a: Any, b: Any) -> Any:
    if op == "+" and isinstance(a, str) and isinstance(b, str):
        return _capped(a + b)
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        raise EvalError(f"cannot apply {op!r} to {type(a).__name__} and {type(b).__name__}")
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        result = a * b
        if isinstance(result, int) and result.bit_length() > 256:
            raise EvalError("number too large")
        return result
    if b == 0:
        raise EvalError("division by zero")
    return a / b if op == "/" else a % b


Evaluator = Callable[[Mapping[str, Any]], Any]

_ORDERINGS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _compile_field_vs_literal(op: str, name: str, constant: Any) -> Evaluator:
    """``field <op> literal``, the usual filter, in one closure instead of three.

    Same results as the general form: an ordering against a number takes the direct
    path only when the field holds a plain int or float (not bool, not None);
    anything else goes through ``_compare``."""
    if op == "==":
        return lambda r: r.get(name) == constant
    if op == "!=":
        return lambda r: r.get(name) != constant
    ordering = _ORDERINGS[op]
    if constant.__class__ not in (int, float):
        return lambda r: _compare(op, r.get(name), constant)

    def compare_number(r: Mapping[str, Any]) -> bool:
        value = r.get(name)
        if value.__class__ is int or value.__class__ is float:
            return ordering(value, constant)
        return _compare(op, value, constant)

    return compare_number


def _compile(node: tuple) -> Evaluator:
    """Turn a checked tree into nested closures, once per expression.

    Why closures and not a tree walk per record: a filter runs on every record of a
    live pipeline, and dispatching on node kinds each time cost ~3x more. Closures
    only ever call the operations below and the whitelisted FUNCTIONS; nothing is
    generated as source text and nothing reaches ``eval``."""
    kind = node[0]
    if kind == "lit":
        constant = node[1]
        return lambda r: constant
    if kind == "field":
        path = node[1]
        if len(path) == 1:
            name = path[0]
            return lambda r: r.get(name)  # a missing field reads as None
        return lambda r: None if (v := lookup(r, path)) is _MISSING else v
    if kind in ("and", "or"):
        left, right = _compile(node[1]), _compile(node[2])
        if kind == "and":
            return lambda r: True if left(r) and right(r) else False
        return lambda r: True if left(r) or right(r) else False
    if kind == "not":
        inner = _compile(node[1])
        return lambda r: not inner(r)
    if kind == "cmp":
        op, left_node, right_node = node[1], node[2], node[3]
        if left_node[0] == "field" and len(left_node[1]) == 1 and right_node[0] == "lit":
            return _compile_field_vs_literal(op, left_node[1][0], right_node[1])
        left, right = _compile(left_node), _compile(right_node)
        if op == "==":
            return lambda r: left(r) == right(r)
        if op == "!=":
            return lambda r: left(r) != right(r)
        return lambda r: _compare(op, left(r), right(r))
    if kind == "in":
        item_of, container_of, negated = _compile(node[1]), _compile(node[2]), node[3]

        def contains(r: Mapping[str, Any]) -> bool:
            item, container = item_of(r), container_of(r)
            if isinstance(container, str):
                found = isinstance(item, str) and item in container
            elif isinstance(container, (list, tuple, dict)):
                try:
                    found = item in container
                except TypeError:
                    found = False
            else:
                found = False
            return not found if negated else found

        return contains
    if kind == "neg":
        inner = _compile(node[1])

        def negate(r: Mapping[str, Any]) -> Any:
            value = inner(r)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise EvalError(f"cannot negate {type(value).__name__}")
            return -value

        return negate
    if kind == "bin":
        op, left, right = node[1], _compile(node[2]), _compile(node[3])
        return lambda r: _arith(op, left(r), right(r))
    if kind == "list":
        items = [_compile(item) for item in node[1]]
        return lambda r: [f(r) for f in items]
    if kind == "call":
        name, args = node[1], node[2]
        if name == "exists":
            path = args[0][1]
            return lambda r: lookup(r, path) is not _MISSING
        fn = FUNCTIONS[name][0]
        assert fn is not None
        arg_fns = [_compile(a) for a in args]

        def call(r: Mapping[str, Any]) -> Any:
            values = [f(r) for f in arg_fns]
            try:
                return fn(*values)
            except EvalError:
                raise
            except (TypeError, ValueError, OverflowError) as exc:
                raise EvalError(f"{name}(): {exc}") from None

        return call
    raise ExprError(f"unknown node {kind}")  # unreachable for parsed trees


def _scalar_literal(node: tuple) -> bool:
    return node[0] == "lit" and (node[1] is None or node[1].__class__ in (str, int, float, bool))


def _operand(node: tuple) -> bool:
    return node[0] in ("field", "lit")


def _never_raises(node: tuple) -> bool:
    """Whether the compiled ``node`` gives a value for every record and never raises.

    Fields and literals; the logic of such parts; ``exists``; and comparisons or
    ``in`` where one side is a scalar literal (or the container a list of them), so
    every comparison made is against a scalar: ``_compare`` and ``in`` answer False for
    incomparable values, and nothing recurses. Not field against field: two deeply
    nested lists from a hostile record compared with ``==`` raise RecursionError,
    which the wrapper in ``app.patterns.condition`` turns into "no match"."""
    kind = node[0]
    if kind in ("field", "lit"):
        return True
    if kind == "cmp":
        left, right = node[2], node[3]
        return (_scalar_literal(left) and _operand(right)) or (_scalar_literal(right) and _operand(left))
    if kind == "in":
        item, container = node[1], node[2]
        scalars = container[0] == "list" and all(_scalar_literal(i) for i in container[1])
        return (_scalar_literal(item) and _operand(container)) or (_operand(item) and scalars)
    if kind in ("and", "or"):
        return _never_raises(node[1]) and _never_raises(node[2])
    if kind == "not":
        return _never_raises(node[1])
    return kind == "call" and node[1] == "exists"


def always_boolean(tree: tuple) -> bool:
    """Whether ``evaluate`` returns True or False for every record and never raises,
    so a caller that wants a condition can use it as it is (no wrapper)."""
    if not _never_raises(tree):
        return False
    return tree[0] in ("cmp", "and", "or", "not", "in") or tree[:2] == ("call", "exists")


class Expr:
    """A compiled expression; ``evaluate(record)`` returns its value."""

    __slots__ = ("text", "tree", "evaluate", "is_condition")

    def __init__(self, text: str, tree: tuple) -> None:
        self.text = text
        self.tree = tree
        #: ``evaluate(record)``: the value of this expression for one record; EvalError
        #: if it cannot be had. The compiled closure itself (no method call per record).
        self.evaluate: Evaluator = _compile(tree)
        #: True when ``evaluate`` always returns a bool and never raises (``always_boolean``).
        self.is_condition = always_boolean(tree)

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"


def compile_expr(text: Any) -> Expr:
    """Parse and check expression text; ExprError says what is wrong and where."""
    if not isinstance(text, str):
        raise ExprError(f"an expression must be a string, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression longer than {MAX_LENGTH} characters")
    if not text.strip():
        raise ExprError("empty expression")
    return Expr(text, _Parser(tokenize(text)).parse())


__all__ = ["EvalError", "Expr", "ExprError", "FUNCTIONS", "always_boolean", "compile_expr", "tokenize"]
