import pytest

from fruitlens.config import TrainConfig, apply_overrides, parse_overrides
from fruitlens.errors import ConfigError


def test_overrides_dotted_and_bare_keys_are_typed():
    cfg = apply_overrides(TrainConfig(), parse_overrides(["fit.epochs=5", "hflip=false", "augment.rotation=7.5"]))
    assert cfg.fit.epochs == 5 and cfg.augment.hflip is False and cfg.augment.rotation == 7.5


def test_unknown_key_says_did_you_mean():
    with pytest.raises(ConfigError, match="Did you mean 'fit.epochs'"):
        apply_overrides(TrainConfig(), {"fit.epoch": "3"})


def test_bad_value_names_key_and_expectation():
    with pytest.raises(ConfigError, match="fit.epochs: expected a number"):
        apply_overrides(TrainConfig(), {"fit.epochs": "many"})
    with pytest.raises(ConfigError, match="data.val"):
        apply_overrides(TrainConfig(), {"data.val": "1.5"}).validated()


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["epochs"])


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(TrainConfig(), {"model.name": "small_cnn", "fit.lr": "0.01", "data.seed": "3"})
    cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_yaml_unknown_key_is_reported_with_file(tmp_path):
    (tmp_path / "c.yaml").write_text("fit:\n  epohcs: 3\n")
    with pytest.raises(ConfigError, match="c.yaml.*Did you mean 'fit.epochs'"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
