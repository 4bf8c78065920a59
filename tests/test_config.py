import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from launch.cli import cli
from trainer.config import Config, apply_override, describe_keys, hyperparameter_items, load_config, save_config
from trainer.config.loading import to_dict
from trainer.data.plan import check_batch_divides
from trainer.errors import ConfigError
from trainer.tpu import short_loop_warning

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name", ["quickstart", "quickstart_paper_cnn", "paper_cnn", "smoke", "cifar10_tpu", "photos_mobilenet"]
)
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
    keys = {row.key for row in describe_keys()}
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
    script = (
        "import sys, trainer; assert 'tensorflow' not in sys.modules; "
        "[getattr(trainer, name) for name in trainer.__all__]"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


# --- what each key means: `launch config keys` ---------------------------------------------


def _config_fields(cls=Config, prefix=""):
    """(dotted name, field) of every field of every config dataclass, sections included."""
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        yield name, f
        if dataclasses.is_dataclass(f.default_factory):
            yield from _config_fields(f.default_factory, f"{name}.")


def test_every_key_and_section_has_a_one_line_meaning():
    fields = dict(_config_fields())
    assert len(fields) > 60
    for name, f in fields.items():
        meaning = f.metadata.get("help", "")
        assert meaning.strip() and "\n" not in meaning and len(meaning) <= 100, (name, meaning)
    rows = describe_keys()
    assert [row.key for row in rows] == list(hyperparameter_items(Config()))
    assert all(row.meaning == fields[row.key].metadata["help"] for row in rows)
    assert next(row for row in rows if row.key == "eval.tta").choices == ("none", "flip", "flip_translate")
    assert next(row for row in rows if row.key == "data.batch_size")[1:3] == ("int", 128)


def test_config_keys_prints_aligned_columns_with_the_meaning():
    result = CliRunner().invoke(cli, ["config", "keys"])
    assert result.exit_code == 0, result.output
    header, *lines = result.output.splitlines()
    rows = describe_keys()
    assert len(lines) == len(rows)
    longest = max(rows, key=lambda row: len(row.key))
    assert len(longest.key) > 28  # the old fixed column: longer keys pushed their row out of line
    starts = [header.index(title) for title in ("type", "default", "meaning")]
    assert starts[0] == len(longest.key) + 2
    for line, row in zip(lines, rows):
        assert line.startswith(row.key + " "), line
        for start in starts:  # every column starts at the header's offset, after a gap
            assert line[start - 2 : start] == "  " and line[start] != " ", (line, start)
        assert line[starts[0] :].split()[0] == row.kind
        assert line[starts[2] :].startswith(row.meaning)
        assert line.endswith(f"[{' | '.join(row.choices)}]") == bool(row.choices)
    assert next(line for line in lines if line.startswith(longest.key + " "))[starts[0] :].startswith(longest.kind)


def test_config_keys_does_not_start_tensorflow():
    script = (
        "import sys; from click.testing import CliRunner; from launch.cli import cli; "
        "result = CliRunner().invoke(cli, ['config', 'keys']); assert result.exit_code == 0, result.output; "
        "assert 'tensorflow' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


# --- `base:`: a config read over another -----------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_base_is_read_first_then_overridden_key_by_key_then_by_set(tmp_path, monkeypatch):
    _write(tmp_path / "common" / "root.yaml", "seed: 5\ntrain:\n  epochs: 7\n  max_steps: 9\n")
    _write(
        tmp_path / "common" / "base.yaml",
        "base: root.yaml\nseed: 3\ndata:\n  batch_size: 64\n  augment: false\noptimizer:\n  name: adam\n",
    )
    child = _write(
        tmp_path / "exp" / "child.yaml",
        "base: ../common/base.yaml\ndata:\n  batch_size: 32\ntrain:\n  epochs: 2\neval:\n",
    )
    monkeypatch.chdir(tmp_path / "common")  # bases are found beside the file that names them, not in the cwd
    config = load_config(child, ["train.max_steps=4"])
    assert (config.seed, config.data.batch_size, config.data.augment) == (3, 32, False)
    assert (config.optimizer.name, config.train.epochs, config.train.max_steps) == ("adam", 2, 4)
    assert load_config(os.path.relpath(child), ["data.batch_size=16"]).data.batch_size == 16


def test_the_merged_config_is_what_config_show_and_the_workdir_hold(tmp_path):
    _write(tmp_path / "base.yaml", "data:\n  batch_size: 64\n  augment: false\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\ndata:\n  batch_size: 32\n")
    result = CliRunner().invoke(cli, ["config", "show", "--config", str(child)])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert "base" not in shown and shown["data"]["batch_size"] == 32 and shown["data"]["augment"] is False
    config = load_config(child)
    (tmp_path / "run").mkdir()
    save_config(config, tmp_path / "run" / "config.yaml")  # what `launch train` writes to WORKDIR/config.yaml
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "base" not in yaml.safe_load(saved) and yaml.safe_load(saved) == shown
    (tmp_path / "base.yaml").unlink()  # the workdir's copy stands alone
    assert load_config(tmp_path / "run" / "config.yaml") == config


def _one_line_error(path, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bases_that_include_each_other_are_refused_naming_the_chain(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\nseed: 1\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    _one_line_error(a, rf"config bases form a cycle: {a} -> {tmp_path / 'b.yaml'} -> {a};")
    itself = _write(tmp_path / "self.yaml", "base: self.yaml\n")
    _one_line_error(itself, "cycle: .*self.yaml -> .*self.yaml;")
    dotted = _write(tmp_path / "dotted.yaml", "base: ./dotted.yaml\n")
    _one_line_error(dotted, r"cycle: .*dotted.yaml -> .*/\./dotted.yaml \(.*/\./dotted.yaml is .*dotted.yaml\)")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "real.yaml")
    real = _write(tmp_path / "real.yaml", "base: link.yaml\n")
    message = _one_line_error(real, "cycle: .*real.yaml -> .*link.yaml")
    assert "link.yaml is" in message


def test_a_missing_or_malformed_base_is_one_line_naming_the_file_that_asked(tmp_path):
    child = _write(tmp_path / "exp" / "child.yaml", "base: ../nope.yaml\n")
    message = _one_line_error(child, "names base '../nope.yaml', which is not found")
    assert message.startswith(str(child)) and message.endswith(str(tmp_path / "exp" / "../nope.yaml"))
    for value in ("3", "[a.yaml]", "", "'  '", "{x: 1}"):
        _write(child, f"base: {value}\n")
        _one_line_error(child, rf"{child}: base must be a config file's path \(a string\), got ")
    _write(tmp_path / "exp" / "broken.yaml", "data: [\n")
    _write(child, "base: broken.yaml\n")
    _one_line_error(child, r"broken.yaml is not valid YAML")
    _write(tmp_path / "exp" / "broken.yaml", "data:\n  batchsize: 3\n")
    _one_line_error(child, r"unknown key 'data.batchsize'")


def test_a_long_chain_of_bases_and_a_huge_base_are_one_line_not_minutes(tmp_path):
    """~970 distinct bases ran into Python's recursion limit ("nests lists ... thousands of
    levels deep", naming a file that nests nothing); a 2 MB base took ~25 s to parse."""
    for i in range(40):
        _write(tmp_path / f"c{i}.yaml", f"base: c{i + 1}.yaml\n")
    _write(tmp_path / "c40.yaml", "seed: 1\n")
    _one_line_error(tmp_path / "c0.yaml", r"c0.yaml: its chain of bases is over 32 files long \(at .*c31.yaml\)")
    assert load_config(tmp_path / "c10.yaml").seed == 1  # 30 bases: fine
    _write(tmp_path / "big.yaml", "x: [" + "1," * 600_000 + "]\n")
    child = _write(tmp_path / "child.yaml", "base: big.yaml\n")
    _one_line_error(child, r"big.yaml is 1,200,006 bytes, not a config")


def test_a_workdirs_config_yaml_naming_a_base_is_refused_not_followed(tmp_path):
    """A saved config is merged (no base:); one that names a base was edited, and followed it
    would read any file (quoting a line of it in the error: a credentials file's key) or
    fetch a gs:// object with the user's credentials, from a shared workdir."""
    from trainer.workdir import Workdir

    _write(tmp_path / "secret" / "credentials", "[default]\naws_access_key_id = AKIAFAKE\n")
    run = tmp_path / "run"
    save_config(Config(), _write(run / "config.yaml", ""))
    assert Workdir(run).require_config() == Config()
    (run / "config.yaml").write_text("base: ../secret/credentials\n")
    with pytest.raises(
        ConfigError, match=r"config.yaml names a base \('../secret/credentials'\), which a saved"
    ) as err:
        Workdir(run).require_config()
    assert "AKIA" not in str(err.value)
    save_config(Config(), run / "config.yaml")
    assert load_config(_write(tmp_path / "mine.yaml", "base: run/config.yaml\n")) == Config()  # a user's file may


# What configs/cifar10_fast.yaml said before cifar10_airbench94.yaml took it as its base.
FAST_RECIPE = {
    "seed": 0,
    "data": {
        "source": "cifar10",
        "batch_size": 512,
        "augment": True,
        "crop_padding": 2,
        "pad_mode": "reflect",
        "flip": "alternating",
    },
    "model": {"name": "airbench", "width": 32},
    "optimizer": {
        "name": "sgd",
        "learning_rate": 0.75,
        "schedule": "linear",
        "warmup_epochs": 0.5,
        "momentum": 0.85,
        "nesterov": True,
        "weight_decay": 0.0089,
        "bias_lr_multiplier": 64.0,
        "label_smoothing": 0.2,
        "ema_momentum": 0.0,
    },
    "train": {"epochs": 10, "steps_per_loop": 97},
    "eval": {"tta": "flip_translate"},
    "runtime": {"precision": "mixed_bfloat16"},
    "tensorboard": {"images": False},
}


@pytest.mark.parametrize("name, width", [("cifar10_fast", 32), ("cifar10_airbench94", 64)])
def test_the_recipes_sharing_a_base_resolve_as_before(name, width):
    expected = to_dict(Config())
    for section, values in FAST_RECIPE.items():
        expected[section] = {**expected[section], **values} if isinstance(values, dict) else values
    expected["model"]["width"] = width
    assert to_dict(load_config(REPO / "configs" / f"{name}.yaml")) == expected


def test_accumulation_must_cut_the_batch_evenly_and_min_delta_needs_a_patience():
    with pytest.raises(
        ConfigError, match=r"data.batch_size=64 must be divisible by optimizer.gradient_accumulation_steps=3"
    ):
        load_config(None, ["data.batch_size=64", "optimizer.gradient_accumulation_steps=3"])
    # Per replica too, once their number is known: 24 = 2 replicas x 12, not x 8 micro-batches.
    with pytest.raises(ConfigError, match=r"divisible by the 2 replicas x 8 micro-batches .*; use a multiple of 16"):
        check_batch_divides(24, 2, 8)
    check_batch_divides(32, 2, 8)
    with pytest.raises(
        ConfigError, match="train.early_stopping_min_delta does nothing without train.early_stopping_patience"
    ):
        load_config(None, ["train.early_stopping_min_delta=0.01"])
    config = load_config(None, ["train.early_stopping_patience=3", "train.early_stopping_min_delta=0.01"])
    assert (config.train.early_stopping_patience, config.optimizer.gradient_accumulation_steps) == (3, 1)


def test_a_tpu_warns_about_short_calls_but_not_about_whole_epochs():
    """A compiled call ends at an epoch's end anyway, so a loop of one epoch is never short;
    the shipped TPU config (48 steps an epoch) runs without the warning."""
    config = load_config(REPO / "configs" / "cifar10_tpu.yaml")
    per_epoch = 50_000 // config.data.batch_size
    assert per_epoch == 48 and short_loop_warning(config.train.steps_per_loop, per_epoch) is None
    assert short_loop_warning(48, 48) is None and short_loop_warning(10, 10) is None
    warning = short_loop_warning(8, 48)
    assert warning == (
        "Warning: train.steps_per_loop=8 is small for a TPU, where host round trips dominate; "
        "use 100 or more (or one epoch: 48 steps)"
    )
    assert short_loop_warning(49, 390) is not None and short_loop_warning(50, 390) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("optimizer.plateau_patience=3",), "optimizer.plateau_patience is for optimizer.schedule=plateau, not cosine"),
        (("optimizer.plateau_min_lr=0.001",), "optimizer.plateau_min_lr is for optimizer.schedule=plateau"),
        (
            ("optimizer.schedule=plateau", "optimizer.learning_rate=0.01", "optimizer.plateau_min_lr=0.01"),
            "optimizer.plateau_min_lr=0.01 is not below optimizer.learning_rate=0.01",
        ),
        (("data.randaugment_magnitude=0.9",), "data.randaugment_magnitude does nothing with data.randaugment_ops=0"),
    ],
)
def test_a_setting_of_a_feature_that_is_off_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO / "configs" / "smoke.yaml", list(overrides))
    load_config(REPO / "configs" / "smoke.yaml", ["optimizer.schedule=plateau", "optimizer.plateau_patience=3"])
    load_config(REPO / "configs" / "smoke.yaml", ["data.randaugment_ops=2", "data.randaugment_magnitude=0.9"])
