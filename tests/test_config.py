"""Typed configs: YAML + key=value overrides, unknown keys and bad values are clear errors."""

import pytest

from seal.baselines import BaselinesConfig
from seal.config import ConfigError, from_dict, parse_overrides, validate_tree


def test_overrides_nest_and_parse_types():
    o = parse_overrides(
        ["inner_loop.epochs=3", "model=tiny-random", "modes=[single,cpt]", "inner_loop.chat=false"]
    )
    cfg = from_dict(BaselinesConfig, o)
    assert cfg.inner_loop.epochs == 3 and cfg.model == "tiny-random"
    assert cfg.modes == ("single", "cpt") and cfg.inner_loop.chat is False


@pytest.mark.parametrize(
    "data, message",
    [
        ({"modell": "x"}, "modell: unknown key (did you mean 'model'?)"),
        ({"inner_loop": {"epochs": "many"}}, "inner_loop.epochs: expected an integer"),
        ({"inner_loop": {"lr": -1}}, "inner_loop.lr: must be in (0, 1]"),
        ({"inner_loop": {"target_modules": ["q_proj", "qq"]}}, "unknown module(s) ['qq']"),
        ({"self_edit": {"prompt": "nope"}}, "self_edit.prompt: unknown variant 'nope'"),
        ({"modes": ["single", "x"]}, "modes: unknown mode(s) ['x']"),
        ({"inner_loop": 3}, "inner_loop: expected a mapping"),
    ],
)
def test_bad_config_is_a_clear_error(data, message):
    with pytest.raises(ConfigError) as e:
        validate_tree(from_dict(BaselinesConfig, data))
    assert message in str(e.value)


def test_user_prompt_variant():
    cfg = from_dict(
        BaselinesConfig,
        {
            "self_edit": {
                "prompt": "facts",
                "extra_prompts": {"facts": {"instruction": "List the facts.", "cue": "Facts:\n"}},
            }
        },
    )
    validate_tree(cfg)
    assert cfg.self_edit.variants()["facts"].cue == "Facts:\n"
