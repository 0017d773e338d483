from typing import Literal

import pytest

from gonogo.errors import UserError
from gonogo.typed_config import Strict, apply_overrides, load_toml, parse_scalar, resolve_preset, validate


class Inner(Strict):
    lr: float = 1e-3
    schedule: Literal["cosine", "constant"] = "cosine"


class Outer(Strict):
    steps: int = 10
    name: str = "x"
    train: Inner = Inner()


def test_scalars_parse_as_toml():
    assert parse_scalar("3") == 3 and parse_scalar("3.5") == 3.5 and parse_scalar("true") is True
    assert parse_scalar('"quoted"') == "quoted" and parse_scalar("bare") == "bare"
    assert parse_scalar("[1, 2]") == [1, 2]


def test_dotted_overrides_reach_nested_tables():
    data = apply_overrides({"train": {"lr": 0.1}}, ["train.lr=0.5", "steps=7", "train.schedule=constant"])
    config = validate(Outer, data, "x.toml")
    assert config.train.lr == 0.5 and config.steps == 7 and config.train.schedule == "constant"


def test_override_errors():
    with pytest.raises(UserError, match="not key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(UserError, match="is a value, not a table"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


@pytest.mark.parametrize("data, expected", [
    ({"stesp": 3}, "x.toml: unknown key 'stesp'; allowed keys: name, steps, train"),
    ({"train": {"lrr": 1}}, "unknown key 'train.lrr'; allowed keys: lr, schedule"),
    ({"steps": "many"}, "key 'steps' has bad value 'many'"),
    ({"train": {"schedule": "linear"}}, "key 'train.schedule' has bad value 'linear': Input should be 'cosine' or 'constant'"),
])
def test_one_line_errors_name_file_key_value_and_allowed(data, expected):
    with pytest.raises(UserError) as error:
        validate(Outer, data, "x.toml")
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("a = [")
    with pytest.raises(UserError, match="not valid TOML"):
        load_toml(broken)
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        resolve_preset("nope")
