"""The Python API (#28 item 5): examples/python_api.py run end to end, and the user's own
model function (`model.name=package.module:function`) and actions (`train.actions`), each
way of naming them wrongly included, checked in-process without training."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import trainer
from launch.cli import cli
from tests.conftest import REPO, smoke_config
from trainer.config import Config, hyperparameter_items, load_config, to_yaml
from trainer.errors import ConfigError, DataError
from trainer.evaluation import EvalMetrics
from trainer.loop.actions import LoopState
from trainer.loop.build import _with_user_actions
from trainer.loop.schedule import Due
from trainer.loop.user_actions import RunInfo, UserActions, WindowSnapshot, made_actions
from trainer.models import build_model
from trainer.preemption import StopRequest
from trainer.user_code import resolve

EXAMPLES = REPO / "examples"
# examples/my_model.py's small_convnet at model.width=16 on 32x32x3 images and 10 classes,
# counted by hand: conv 3x3x3->16, conv 3x3x16->32, then Dense 4*4*32 -> 10 (kernels + biases).
SMALL_CONVNET_PARAMETERS = (27 * 16 + 16) + (9 * 16 * 32 + 32) + (4 * 4 * 32 * 10 + 10)


def _run_example(workdir: Path, steps: int) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, str(EXAMPLES / "python_api.py"), "--workdir", str(workdir), "--steps", str(steps)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _checkpoint_parameters(path: str) -> int:
    """The model's parameters as the checkpoint holds them (the optimizer tracks every trainable one)."""
    names = [(name, shape) for name, shape in tf.train.list_variables(path)]
    return sum(math.prod(shape) for name, shape in names if re.match(r"optimizer/_trainable_variables/\d+/", name))


def test_the_example_trains_resumes_evaluates_predicts_and_exports_a_user_model_with_a_user_action(
    tmp_path, monkeypatch
):
    workdir = tmp_path / "api"
    first = _run_example(workdir, steps=24)  # stops at 24 of the 64 steps of 2 epochs
    second = _run_example(workdir, steps=40)  # resumes from the checkpoint of step 24
    assert "Trained to step 24 of 24" in first and "Trained to step 40 of 40" in second
    assert "Resuming" in second

    # The action ran at every logging window (train.steps_per_loop=8), once each, across the
    # resume, with the numbers TensorBoard has: evaluations at the epoch end (32) and the end.
    records = [json.loads(line) for line in (workdir / "metrics_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [8, 16, 24, 32, 40]
    assert [record["step"] for record in records if record["eval_accuracy"] is not None] == [24, 32, 40]
    assert [record["step"] for record in records if record["final"]] == [24, 40]  # each run's last step
    final = records[-1]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert final["final"] and final["eval_accuracy"] == pytest.approx(metrics["accuracy"])
    assert final["eval_accuracy"] > 0.5  # 10 classes: it learned (the synthetic classes are easy)
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 and r["learning_rate"] > 0 for r in records)
    assert [r["epoch"] for r in records] == [r["step"] / 32 for r in records]

    # The saved config names the user's code; the checkpoint holds its network.
    saved = load_config(workdir / "config.yaml", bases=False)
    assert (saved.model.name, saved.train.actions) == ("my_model:small_convnet", ["my_actions:metrics_log"])
    assert _checkpoint_parameters(tf.train.latest_checkpoint(str(workdir / "checkpoints"))) == SMALL_CONVNET_PARAMETERS
    assert f"{SMALL_CONVNET_PARAMETERS:,} parameters" in first

    # evaluate, predict and export, as the example printed them, and the export works alone.
    accuracy = float(re.search(r"Test accuracy ([\d.]+)%", second).group(1)) / 100
    assert accuracy == pytest.approx(metrics["accuracy"], abs=5e-5)
    assert len(re.findall(r"image\d\.png: class_\d \(\d+%\)", second)) == 2
    exported = keras.saving.load_model(workdir / "export" / "model.keras")  # no custom objects needed
    probabilities = exported(np.zeros((1, 32, 32, 3), np.float32)).numpy()
    assert probabilities.shape == (1, 10) and probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert exported.count_params() == SMALL_CONVNET_PARAMETERS

    # Another process rebuilds the model from config.yaml alone, finding my_model.py in the
    # current directory (which sys.path lacks here), and scores the checkpoint the same.
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(EXAMPLES))])
    monkeypatch.delitem(sys.modules, "my_model", raising=False)
    rescored = trainer.evaluate(workdir, warn=lambda _: None)
    assert rescored.accuracy == pytest.approx(metrics["accuracy"]) and rescored.step == 40
    assert str(EXAMPLES) not in sys.path  # searched while importing, not left behind


# --- the user's code, named by import path -----------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a module of the given source on sys.path; returns its (unique) name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"user_code_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(source)
        return name

    return write


MODEL_SOURCE = """
import keras
from keras import layers

def linear(input_shape, num_classes, config):
    inputs = keras.Input(shape=input_shape)
    outputs = layers.Dense(num_classes)(layers.Flatten()(layers.Rescaling(1 / 255)(inputs)))
    return keras.Model(inputs, outputs, name="linear")

def sequential(input_shape, num_classes, config):
    return keras.Sequential([keras.Input(input_shape), layers.Flatten(), layers.Dense(num_classes)], name="seq")

def no_input(input_shape, num_classes, config):
    return keras.Sequential([layers.Flatten(), layers.Dense(num_classes)])

class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = layers.Dense(3)

    def call(self, x):
        return self.dense(x)

def subclassed(input_shape, num_classes, config):
    return Subclassed()

def not_a_model(input_shape, num_classes, config):
    return layers.Dense(num_classes)

def wrong_output(input_shape, num_classes, config):
    inputs = keras.Input(shape=input_shape)
    return keras.Model(inputs, layers.Dense(num_classes + 1)(layers.Flatten()(inputs)))

def wrong_input(input_shape, num_classes, config):
    inputs = keras.Input(shape=(8, 8, 3))
    return keras.Model(inputs, layers.Dense(num_classes)(layers.Flatten()(inputs)))

def softmax(input_shape, num_classes, config):
    inputs = keras.Input(shape=input_shape)
    return keras.Model(inputs, layers.Dense(num_classes, activation="softmax")(layers.Flatten()(inputs)))

def backbone_named(input_shape, num_classes, config):
    inputs = keras.Input(shape=input_shape)
    return keras.Model(inputs, layers.Dense(num_classes)(layers.Flatten()(inputs)), name="resnet50")

def raises(input_shape, num_classes, config):
    raise ValueError(f"width {config.width} is too wide")

def uint8_input(input_shape, num_classes, config):
    inputs = keras.Input(shape=input_shape, dtype="uint8")
    return keras.Model(inputs, layers.Dense(num_classes)(layers.Flatten()(inputs)))

def int_output(input_shape, num_classes, config):
    inputs = keras.Input(shape=input_shape)
    logits = layers.Dense(num_classes)(layers.Flatten()(inputs))
    return keras.Model(inputs, keras.ops.cast(logits, "int32"))

def sets_policy(input_shape, num_classes, config):
    keras.mixed_precision.set_global_policy("mixed_float16")
    return linear(input_shape, num_classes, config)

def exits(input_shape, num_classes, config):
    raise SystemExit(4)

HEAD = layers.Dense(10)  # made once, at import: every model would share (and train) it

def shared_head(input_shape, num_classes, config):
    inputs = keras.Input(shape=input_shape)
    return keras.Model(inputs, HEAD(layers.Flatten()(inputs)))

NOT_CALLABLE = 3
"""


def _build(name: str, width: int = 4) -> keras.Model:
    return build_model(name, input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=width)


def test_a_model_function_builds_a_checked_model_under_the_strategy(user_module):
    module = user_module(MODEL_SOURCE)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _build(f"{module}:linear")
    assert model.name == "linear" and model.count_params() == 32 * 32 * 3 * 10 + 10
    assert all(isinstance(v.value, tf.distribute.DistributedValues) for v in model.weights)  # mirrored
    sequential = _build(f"{module}:sequential")
    assert isinstance(sequential, keras.Model) and not isinstance(sequential, keras.Sequential)
    assert tuple(sequential.output.shape) == (None, 10)  # .input/.output, which exports read


@pytest.mark.parametrize(
    "function, message",
    [
        ("no_input", "without defined inputs (Sequential); build a functional model"),
        ("subclassed", "without defined inputs (Subclassed)"),
        ("not_a_model", "returned Dense, not a keras.Model"),
        ("wrong_output", "output has shape (None, 11); it must be (None, 10)"),
        ("wrong_input", "input has shape (None, 8, 8, 3); the images are (None, 32, 32, 3)"),
        ("softmax", "ends in a softmax; return logits"),
        ("backbone_named", "named 'resnet50', a backbone's name"),
        ("raises", "raised ValueError: width 4 is too wide (/"),
        ("exits", "raised SystemExit: 4 (/"),
        ("uint8_input", "a model of uint8 input and float32 output; it takes float32 pixels"),
        ("int_output", "a model of float32 input and int32 output; it takes float32 pixels"),
        ("sets_policy", "set Keras' global dtype policy to mixed_float16 (it is float32 here); leave it"),
        ("NOT_CALLABLE", "NOT_CALLABLE is an int, not a function or class"),
        ("lineer", "has no 'lineer'; did you mean 'linear'?"),
    ],
)
def test_a_model_function_that_breaks_the_contract_is_named_with_the_fault(user_module, function, message):
    module = user_module(MODEL_SOURCE)
    with pytest.raises(ConfigError) as caught:
        _build(f"{module}:{function}")
    assert str(caught.value).startswith(f"model.name={module}:{function}")
    assert message in str(caught.value)
    assert keras.mixed_precision.global_policy().name == "float32"  # as it was, whatever the function set


def test_a_model_function_that_returns_layers_of_an_earlier_model_is_refused(user_module):
    """A layer made at import is in every model the function returns: the second run (a
    resume, or the next train() of a notebook) would start from the first one's weights."""
    module = user_module(MODEL_SOURCE)
    _build(f"{module}:shared_head")
    with pytest.raises(ConfigError, match="returned layers of a model it built before"):
        _build(f"{module}:shared_head")
    for _ in range(2):  # a new model each call: as often as needed
        _build(f"{module}:linear")


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_module_here:build", "no module named 'no_such_module_here' on Python's path"),
        ("__main__:build", "names the running script"),
        ("subprocess:run", "names Python's standard library (subprocess)"),
        ("os.path:join", "names Python's standard library (os.path)"),
        ("trainer.training:train", "names the trainer's own code (trainer)"),
        ("launch.cli:cli", "names the trainer's own code (launch)"),
        ("not-a-path", "is not an import path; write it as package.module:function"),
    ],
)
def test_an_import_path_that_names_no_usable_code_is_refused_before_anything_runs(path, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(path, "model.name")


def test_a_module_that_fails_to_import_is_named_with_its_line(user_module):
    broken = user_module("import keras\n\nraise RuntimeError('no GPU here')\n")
    expected = rf"importing {broken} failed: RuntimeError: no GPU here \(/.*/{broken}.py:3\)$"
    with pytest.raises(ConfigError, match=expected):
        resolve(f"{broken}:build", "model.name")
    lacking = user_module("import a_dependency_not_installed\n")
    with pytest.raises(ConfigError, match="ModuleNotFoundError: No module named 'a_dependency_not_installed'"):
        resolve(f"{lacking}:build", "model.name")
    exiting = user_module("import sys\n\nsys.exit(2)\n")  # argparse at import, given our arguments, does
    with pytest.raises(ConfigError, match=rf"importing {exiting} failed: SystemExit: 2 \(/.*/{exiting}.py:3\)$"):
        resolve(f"{exiting}:build", "model.name")
    syntax = user_module("def build(:\n")
    with pytest.raises(ConfigError, match=rf"failed: SyntaxError: invalid syntax \(/.*/{syntax}.py:1\)$"):
        resolve(f"{syntax}:build", "model.name")


def test_the_current_directory_is_searched_last_and_left_off_the_path(tmp_path, monkeypatch):
    (tmp_path / "module_in_cwd.py").write_text("def build():\n    return 'built'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "module_in_cwd", raising=False)
    before = list(sys.path)
    assert resolve("module_in_cwd:build", "model.name")() == "built"
    assert sys.path == before


def test_a_built_in_name_is_still_a_registry_lookup():
    with pytest.raises(ConfigError, match="not registered"):
        _build("no_such_net")
    with pytest.raises(DataError):  # airbench's pooling on 4x4 images: as before
        build_model("airbench", input_shape=(4, 4, 3), num_classes=10, mean=[0] * 3, std=[1] * 3)


# --- the config keys ----------------------------------------------------------------------------


def test_model_name_takes_an_import_path_and_train_actions_a_list_of_them(tmp_path):
    config = smoke_config("model.name=pkg.models:build", "train.actions=pkg.watch:log, other:Factory.make")
    assert config.model.name == "pkg.models:build"
    assert config.train.actions == ["pkg.watch:log", "other:Factory.make"]
    assert smoke_config("train.actions=[a.b:c, d:e]").train.actions == ["a.b:c", "d:e"]
    assert smoke_config("train.actions=").train.actions == []
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(config))  # config.yaml keeps them, as a resume and launch evaluate read them
    assert load_config(path, bases=False).train.actions == config.train.actions
    path.write_text("model:\n  name: pkg.models:build\ntrain:\n  actions:\n    - pkg.watch:log\n")
    assert load_config(path).train.actions == ["pkg.watch:log"]
    assert hyperparameter_items(config)["train.actions"] == "pkg.watch:log, other:Factory.make"  # HParams: a string
    assert Config().train.actions == [] and Config().train.actions is not Config().train.actions


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=my_net", "or your own as package.module:function; got 'my_net'"),
        ("train.actions=log_it", "train.actions[0]='log_it' is not an import path; write it as package.module:factory"),
        ("train.actions=[1, 2]", "train.actions must be a list of strings"),
        ("train.actions=[a:b", "train.actions must be a list like"),
        ("model.weights=imagenet", "model.weights is for Keras Applications backbones, not model.name=pkg.m:f"),
    ],
)
def test_a_wrong_model_name_or_action_is_refused_when_the_config_is_read(override, message):
    overrides = ("model.name=pkg.m:f", override) if override.startswith("model.weights") else (override,)
    with pytest.raises(ConfigError, match=re.escape(message)):
        smoke_config(*overrides)


def test_train_actions_in_yaml_must_be_a_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  actions: pkg.watch:log\n")
    with pytest.raises(ConfigError, match=re.escape("train.actions must be a list of strings, e.g. [package")):
        load_config(path)


# --- user actions -------------------------------------------------------------------------------

ACTIONS_SOURCE = """
import sys
import time

CALLS = []

def recorder(run):
    run.config.optimizer.learning_rate = 99.0  # a copy: the run's own config does not change
    def action(step, metrics):
        CALLS.append((step, metrics))
    return action

def broken(run):
    raise KeyError("workdir")

def not_an_action(run):
    return "log"

def failing(run):
    def action(step, metrics):
        raise ZeroDivisionError("window of no steps")
    return action

def exiting(run):
    def action(step, metrics):
        sys.exit(0)
    return action

def interrupting(run):
    def action(step, metrics):
        raise KeyboardInterrupt
    return action

def exiting_factory(run):
    sys.exit(0)

def sleeping(run):
    def action(step, metrics):
        CALLS.append(step)
        time.sleep(60)
    return action
"""


def _info(config: Config) -> RunInfo:
    return RunInfo(config, "/tmp/run", 0, 64, 32)


def _state(step: int, due: Due, last_eval: EvalMetrics | None = None) -> LoopState:
    # A window of 8 steps of 64 images: loss sum, correct, examples, nonfinite, gradient norm sum, steps.
    sums = np.array([512 * 1.5, 256, 512, 0, 8 * 0.25, 8], np.float32)
    return LoopState(step=step, window_sums=sums, window_seconds=2.0, due=due, last_eval=last_eval, saved_step=16)


def _run_actions(named, state: LoopState, step: int):
    window = WindowSnapshot()
    window(step, state)
    optimizer = keras.optimizers.SGD(learning_rate=0.125)
    UserActions(named, window, optimizer, per_epoch=32, global_batch=64)(step, state)


def test_an_action_sees_the_window_and_the_evaluation_as_numbers_and_a_copy_of_the_config(user_module):
    module = user_module(ACTIONS_SOURCE)
    config = smoke_config()
    named = made_actions([f"{module}:recorder"], _info(config))
    assert config.optimizer.learning_rate == 0.02  # the factory changed its copy only
    evaluation = EvalMetrics(0.75, 0.5, {}, [], 256, 32)
    _run_actions(named, _state(32, Due(log=True, evaluate=True, epoch_end=True), evaluation), 32)
    _run_actions(named, _state(40, Due(log=False)), 40)  # no logging window ends there: not called
    _run_actions(named, _state(48, Due(log=True)), 48)
    calls = sys.modules[module].CALLS
    assert [step for step, _ in calls] == [32, 48]
    (_, at_32), (_, at_48) = calls
    assert (at_32.loss, at_32.accuracy, at_32.gradient_norm, at_32.epoch) == (1.5, 0.5, 0.25, 1.0)
    assert (at_32.images_per_second, at_32.learning_rate) == (8 * 64 / 2.0, 0.125)
    assert (at_32.eval_accuracy, at_32.eval_loss, at_48.eval_accuracy) == (0.75, 0.5, None)
    with pytest.raises(AttributeError):
        at_32.loss = 0.0  # read-only


@pytest.mark.parametrize(
    "function, message",
    [
        ("broken", "train.actions[1]={module}:broken raised KeyError: 'workdir' ("),
        ("not_an_action", "train.actions[1]={module}:not_an_action returned str, not an action"),
        ("missing", "train.actions[1]={module}:missing: {module}"),
        ("exiting_factory", "train.actions[1]={module}:exiting_factory raised SystemExit: 0 ("),
    ],
)
def test_a_factory_that_fails_is_named(user_module, function, message):
    module = user_module(ACTIONS_SOURCE)
    with pytest.raises(ConfigError, match=re.escape(message.format(module=module))):
        made_actions([f"{module}:recorder", f"{module}:{function}"], _info(smoke_config()))


def test_an_action_that_raises_stops_the_run_naming_it_and_the_checkpoint_to_resume_from(user_module):
    module = user_module(ACTIONS_SOURCE)
    named = made_actions([f"{module}:failing"], _info(smoke_config()))
    with pytest.raises(ConfigError) as caught:
        _run_actions(named, _state(24, Due(log=True)), 24)
    message = str(caught.value)
    assert message.startswith(f"train.actions[0]={module}:failing raised ZeroDivisionError: window of no steps (")
    assert f"{module}.py:" in message and "at step 24" in message and "last checkpoint is step 16" in message


@pytest.mark.parametrize("function, raised", [("exiting", "SystemExit: 0"), ("interrupting", "KeyboardInterrupt")])
def test_an_action_that_exits_stops_the_run_as_one_that_raises(user_module, function, raised):
    """sys.exit(0) in an action ended `launch train` with exit 0 and no checkpoint, as if done."""
    module = user_module(ACTIONS_SOURCE)
    named = made_actions([f"{module}:{function}"], _info(smoke_config()))
    with pytest.raises(ConfigError, match=re.escape(f"{module}:{function} raised {raised} (")):
        _run_actions(named, _state(24, Due(log=True)), 24)


def test_a_stop_signal_ends_an_action_that_sleeps_and_stops_the_run(user_module):
    """The run's handler sets its flag (the loop stops after this step with a checkpoint), and
    the action's sleep ends: before, it slept on, and only a second signal (no checkpoint) ended it."""
    module = user_module(ACTIONS_SOURCE)
    named = made_actions([f"{module}:sleeping", f"{module}:sleeping"], _info(smoke_config()))
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    started = time.perf_counter()
    with StopRequest(announce=lambda _: None) as stop:
        timer.start()
        _run_actions(named, _state(24, Due(log=True)), 24)
        assert stop.requested and bool(stop.flag.numpy())
        assert signal.getsignal(signal.SIGTERM) == stop._handle  # the run's handler, back in place
    assert time.perf_counter() - started < 30
    assert sys.modules[module].CALLS == [24]  # the window's other actions are skipped


def test_without_train_actions_the_loop_is_as_it_was(user_module):
    """No entry is added (no Python call per window); with them, the chief's list is wrapped."""
    actions = [object(), object()]
    run = SimpleNamespace(config=smoke_config(), runtime=SimpleNamespace(is_chief=True))
    assert _with_user_actions(run, 0, actions) is actions
    module = user_module(ACTIONS_SOURCE)
    run.config.train.actions = [f"{module}:recorder"]
    run.runtime.is_chief = False  # one call per run: the chief's
    assert _with_user_actions(run, 0, actions) is actions
    run.runtime.is_chief = True
    run.parts = SimpleNamespace(total_steps=64, per_epoch=32, optimizer=keras.optimizers.SGD())
    run.wd = SimpleNamespace(root="/tmp/run")
    first, *middle, last = _with_user_actions(run, 0, actions)
    assert isinstance(first, WindowSnapshot) and middle == actions and isinstance(last, UserActions)
    assert trainer.RunInfo is RunInfo and trainer.StepMetrics.__name__ == "StepMetrics"


def test_an_action_that_cannot_be_imported_fails_before_the_workdir_is_touched(tmp_path):
    """A misspelled action module is one error line from `launch train` and from the dry run,
    and the workdir is not created: the path is imported before anything is written."""
    workdir = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "smoke.yaml"), "--workdir", str(workdir)]
    args += ["--set", "train.actions=[no_such_module_4711:make]"]
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(cli, ["train", *args, *extra])
        assert result.exit_code == 2, result.output
        assert "Error: train.actions[0]=no_such_module_4711:make" in result.output, result.output
        assert "Traceback" not in result.output
        assert not workdir.exists()
