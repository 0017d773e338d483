import math

import pytest

from gonogo.gates import Condition, ExpressionError, parse_condition, parse_gate


@pytest.mark.parametrize("text, metrics, passed", [
    ("val_loss <= 2.2", {"val_loss": 2.2}, True),
    ("val_loss <= 2.2", {"val_loss": 2.21}, False),
    ("val_loss < 2.2", {"val_loss": 2.2}, False),
    ("tokens_per_second >= 5000", {"tokens_per_second": 5000}, True),
    ("tokens_per_second > 5000", {"tokens_per_second": 5000}, False),
    ("wrong_total == 0", {"wrong_total": 0}, True),
    ("wrong_total != 0", {"wrong_total": 0}, False),
    ("resumed_bitwise_equal == true", {"resumed_bitwise_equal": True}, True),
    ("resumed_bitwise_equal == true", {"resumed_bitwise_equal": False}, False),
    ("backend == gloo", {"backend": "gloo"}, True),
    ('backend == "nccl"', {"backend": "gloo"}, False),
    ("maj@8 >= 0.5", {"maj@8": 0.75}, True),
    ("ratio >= 1e-3", {"ratio": 0.002}, True),
])
def test_gate_evaluation(text, metrics, passed):
    assert parse_gate(text).evaluate(metrics).passed is passed


def test_missing_metric_fails_never_passes():
    result = parse_gate("val_loss <= 100").evaluate({})
    assert not result.passed and result.reason == "not measured"
    assert not parse_gate("val_loss <= 100").evaluate({"val_loss": None}).passed


def test_type_mismatch_and_nan_fail():
    assert not parse_gate("x >= 1").evaluate({"x": "big"}).passed
    assert not parse_gate("x >= 1").evaluate({"x": True}).passed      # a bool is not a number here
    assert not parse_gate("x == true").evaluate({"x": 1}).passed
    assert not parse_gate("x <= 1").evaluate({"x": math.nan}).passed
    assert not parse_gate("x != 1").evaluate({"x": math.nan}).passed


@pytest.mark.parametrize("text", ["val_loss", "val_loss <=", "<= 2", "val_loss => 2", "val loss <= 2",
                                  "x <= [1, 2]", 3])
def test_malformed_gates(text):
    with pytest.raises(ExpressionError):
        parse_gate(text)


def test_conditions():
    assert parse_condition(">= 10").holds(10.5)
    assert not parse_condition(">= 10").holds(9.9)
    assert parse_condition("< 1").holds(0.0)
    assert parse_condition(True) == Condition("==", True)
    with pytest.raises(ExpressionError):
        parse_condition("ten or more")
