from pathlib import Path

import pytest

from trainer.config import Config, apply_override, describe_keys, load_config, save_config
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["quickstart", "paper_cnn", "smoke", "cifar10_tpu", "photos_mobilenet"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(config, Config)


def test_overrides_are_coerced_to_the_field_type():
    config = load_config(
        None,
        [
            "data.batch_size=256",
            "optimizer.learning_rate=0.1",
            "data.augment=false",
            "runtime.strategy=mirrored",
            "seed=7",
        ],
    )
    assert config.data.batch_size == 256
    assert config.optimizer.learning_rate == pytest.approx(0.1)
    assert config.data.augment is False
    assert config.runtime.strategy == "mirrored"
    assert config.seed == 7


def test_yaml_int_is_accepted_for_a_float_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  learning_rate: 1\n")
    assert load_config(path).optimizer.learning_rate == 1.0


def test_unknown_key_suggests_the_nearest_name():
    with pytest.raises(ConfigError, match=r"unknown key 'data.batchsize'.*did you mean 'batch_size'"):
        load_config(None, ["data.batchsize=3"])


def test_unknown_yaml_key_names_section_and_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "unknown key 'train.epoch'" in str(err.value)
    assert "did you mean 'epochs'" in str(err.value)
    assert "max_steps" in str(err.value)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"data.batch_size must be an integer, got 'big'"):
        load_config(None, ["data.batch_size=big"])


def test_wrong_yaml_type_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  augment: 3\n")
    with pytest.raises(ConfigError, match="data.augment must be true or false, got 3"):
        load_config(path)


def test_choice_error_lists_valid_values_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["runtime.precision=mixed_float61"])
    message = str(err.value)
    assert "float32, mixed_float16, mixed_bfloat16" in message
    assert "did you mean 'mixed_float16'" in message


def test_range_is_checked():
    with pytest.raises(ConfigError, match=r"data.batch_size must be >= 1, got 0"):
        load_config(None, ["data.batch_size=0"])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override(Config(), "data.batch_size")


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["data.batch_size=32", "model.name=resnet_small"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_required_keys_exist():
    keys = {key for key, _, _ in describe_keys()}
    for key in [
        "seed",
        "data.source",
        "data.path",
        "data.batch_size",
        "data.augment",
        "model.name",
        "train.epochs",
        "train.max_steps",
        "train.steps_per_loop",
        "optimizer.name",
        "optimizer.learning_rate",
        "optimizer.schedule",
        "optimizer.momentum",
        "optimizer.weight_decay",
        "optimizer.label_smoothing",
        "runtime.strategy",
        "runtime.precision",
        "runtime.cpu_replicas",
        "checkpoint.every_steps",
        "checkpoint.keep",
    ]:
        assert key in keys


def test_public_api_resolves_and_importing_it_does_not_start_tensorflow():
    import subprocess
    import sys

    script = (
        "import sys, trainer; assert 'tensorflow' not in sys.modules; "
        "[getattr(trainer, name) for name in trainer.__all__]"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
