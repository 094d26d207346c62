"""The safe expression language: what it computes, and what it refuses."""

from __future__ import annotations

import pytest

from operators.expr import MAX_DEPTH, MAX_LENGTH, EvalError, ExprError, compile_expr

RECORD = {"value": 12, "action": "click", "country": " DE ", "user": {"tier": "gold", "age": 30},
          "tags": ["a", "b"], "price": 2.5, "flag": False, "nothing": None}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("value > 10 and action == 'click'", True),
        ("value > 10 and action == 'view'", False),
        ("value > 100 or action == \"click\"", True),
        ("not value > 100", True),
        ("value + 3 * 2", 18),
        ("(value + 3) * 2", 30),
        ("-value + 2", -10),
        ("value % 5", 2),
        ("price * 2 / 5", 1.0),
        ("user.tier == 'gold' and user.age >= 30", True),
        ("'a' in tags and 'z' not in tags", True),
        ("'li' in action", True),
        ("lower(trim(country)) in ['de', 'at']", True),
        ("upper(action)", "CLICK"),
        ("len(tags) == 2", True),
        ("exists(user.tier) and not exists(user.email)", True),
        ("exists(nothing)", True),
        ("missing == null", True),
        ("missing > 3", False),
        ("missing < 3", False),
        ("action > 3", False),
        ("startswith(action, 'cl') and endswith(action, 'ck') and contains(action, 'lic')", True),
        ("concat(action, '-', value)", "click-12"),
        ("coalesce(missing, nothing, 'x')", "x"),
        ("round(price * 3, 1)", 7.5),
        ("int('42') + float('0.5')", 42.5),
        ("abs(-3) + min(4, 2) + max(1, 9)", 14),
        ("substr(action, 1, 3)", "li"),
        ("replace(action, 'c', 'k')", "klikk"),
        ("flag == false and true and not null", True),
        ("True and None == null", True),
        ("1e3 == 1000", True),
        ("'it\\'s'", "it's"),
    ],
)
def test_expressions_evaluate(text, expected):
    assert compile_expr(text).evaluate(RECORD) == expected


@pytest.mark.parametrize(
    "text",
    [
        "value / 0",
        "action + 1",
        "-action",
        "lower(value)",
        "int('x')",
        "len(value)",
    ],
)
def test_evaluation_errors_fail_the_record_not_the_process(text):
    with pytest.raises(EvalError):
        compile_expr(text).evaluate(RECORD)


HOSTILE = [
    "().__class__",
    "value.__class__.__mro__",  # dotted names read mapping keys only; this parses but reads None
    "__import__('os').system('id')",
    "eval('1')",
    "open('/etc/passwd')",
    "getattr(value, 'real')",
    "lambda: 1",
    "[x for x in tags]",
    "value; 1",
    "value if true else 1",
    "a = 1",
    "`id`",
    "value ** 2",
    "{'a': 1}",
    "user['tier']",
    "f'{value}'",
    "",
    "   ",
    "value >",
    "(value",
    "lower(value",
    "len()",
    "lower('a', 'b')",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_or_broken_expressions_are_refused_cleanly(text):
    if text == "value.__class__.__mro__":
        # Not an attribute access: a path of mapping keys that this record lacks.
        assert compile_expr(text).evaluate(RECORD) is None
        assert compile_expr(text).evaluate({"value": 1}) is None
        return
    with pytest.raises(ExprError):
        compile_expr(text)


def test_deep_nesting_is_refused():
    with pytest.raises(ExprError, match="nests deeper"):
        compile_expr("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(ExprError, match="nests deeper"):
        compile_expr("not " * (MAX_DEPTH + 2) + "true")
    with pytest.raises(ExprError, match="nests deeper"):
        compile_expr("lower(" * (MAX_DEPTH + 1) + "'a'" + ")" * (MAX_DEPTH + 1))


def test_huge_inputs_are_refused():
    with pytest.raises(ExprError, match="longer than"):
        compile_expr("1 + " * MAX_LENGTH + "1")
    with pytest.raises(ExprError, match="tokens"):
        compile_expr("+".join(["1"] * 1500)[: MAX_LENGTH - 1])


def test_huge_values_are_refused_at_evaluation():
    big = {"s": "x" * 600_000}
    with pytest.raises(EvalError):
        compile_expr("s + s").evaluate(big)
    with pytest.raises(EvalError):
        compile_expr("concat(s, s)").evaluate(big)
    with pytest.raises(EvalError):
        compile_expr("n * n * n * n * n").evaluate({"n": 10**60})


def test_long_flat_chains_are_fine():
    text = " and ".join(["value > 1"] * 100)
    assert compile_expr(text).evaluate(RECORD) is True


def test_non_string_expression_is_refused():
    with pytest.raises(ExprError):
        compile_expr(42)  # type: ignore[arg-type]


def test_unknown_function_is_named():
    with pytest.raises(ExprError, match="unknown function 'system'"):
        compile_expr("system('id')")


@pytest.mark.parametrize("text,expected", [
    ("value > 10", True), ("action == 'click'", True), ("a.b != 'c'", True),
    ("x > 1 and (y == 2 or not z)", True), ("country in ['BR', 'AR']", True),
    ("exists(a.b)", True), ("not flag", True), ("'x' in name", True), ("null == a", True),
    ("a == b", False),                  # field against field: deep lists can recurse
    ("country != match.login.country", False),
    ("a in b", False), ("a in [b, 'x']", False), ("a == [1, 2]", False),
    ("value", False),                   # a field's own value, not a bool
    ("value * 2 > 10", False),          # arithmetic can fail (EvalError)
    ("lower(name) == 'x'", False),      # a function can fail
    ("-value < 0", False),              # negation can fail
    ("1 + 1", False),
])
def test_always_boolean_only_for_conditions_that_cannot_fail(text, expected):
    from operators.expr import always_boolean

    assert always_boolean(compile_expr(text).tree) is expected
    assert compile_expr(text).is_condition is expected


def test_a_condition_comparing_deep_fields_is_false_not_a_crash():
    """Two fields holding lists nested deeper than Python's recursion limit: ``==``
    raises RecursionError; a pattern condition must answer False (its wrapper)."""
    from app.patterns import condition

    deep: list = []
    for _ in range(5000):
        deep = [deep]
    other: list = []
    for _ in range(5000):
        other = [other]
    for text in ("a == b", "a != b", "a in [b]", "a < b"):
        assert condition(text, "where")({"a": deep, "b": other}) is False
