"""`launch`: the command line. Each command parses, builds a config, calls one library function.

TensorFlow is imported only inside commands that need it (so `--help` and `--version` are
instant), with its start-up notices hidden unless `--verbose`. User mistakes (`TrainerError`)
and usage errors (an unknown option or command, a missing argument, a bad value) become
one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import click

from launch.version import version_line
from trainer import export_formats
from trainer.errors import ConfigError, DataError, RuntimeSetupError, TrainerError
from trainer.storage import is_url, workdir_spelling

_INSTALL_HINT = (
    "TensorFlow is not installed: run pip install -e '.[cpu]' (CPU only), '.[gpu]' (NVIDIA GPUs) "
    "or '.[tpu]' (Cloud TPU VM)"
)


class _UsageLine(click.ClickException):
    """A usage error as one `Error: ...` line (click prints it on stderr), exit code 2."""

    exit_code = 2


@contextlib.contextmanager
def _usage_in_one_line():
    """Click's usage errors without its Usage:/Try lines: its message, then the help hint."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # `launch` or `launch data` alone: the help, as click shows it
    except click.UsageError as err:
        command = err.ctx.command_path if err.ctx else "launch"
        message = " ".join(err.format_message().split())
        stop = "" if message.endswith((".", "?", "!", ")")) else "."
        raise _UsageLine(f"{message}{stop} Try '{command} --help'.") from None


class _NamesItsCommand:
    """A parse error names the command it happened in (click leaves some, e.g. an option
    missing its value, to the parent's context, whose --help would be the wrong hint)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as err:
            err.ctx = err.ctx or ctx
            raise


class _Command(_NamesItsCommand, click.Command):
    pass


class _Group(_NamesItsCommand, click.Group):
    """Turns user mistakes into one clean line instead of a traceback or a usage block."""

    command_class = _Command
    group_class = type  # `data`, `config`: groups of this class too

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        with _usage_in_one_line():  # the root's own options (`launch --bad`)
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context):
        try:
            with _usage_in_one_line():  # a command's options and arguments, a command's name
                return super().invoke(ctx)
        except TrainerError as err:
            click.echo(f"Error: {err}", err=True)
            if err.leaves_thread_blocked:  # its call's thread is stuck in TensorFlow for good
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(err.exit_code)
            ctx.exit(err.exit_code)
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] in ("tensorflow", "keras"):
                click.echo(f"Error: {_INSTALL_HINT}", err=True)
                ctx.exit(2)
            raise


def _load(module: str, verbose: bool):
    """Import a library module that needs TensorFlow, quietly unless `verbose`."""
    if importlib.util.find_spec("tensorflow") is None:
        raise RuntimeSetupError(_INSTALL_HINT)
    if verbose or "tensorflow" in sys.modules:
        return importlib.import_module(module)
    loaded = _import_quietly(module)
    # TensorFlow's Python-side warnings (about its own internals) are not for users either.
    sys.modules["tensorflow"].get_logger().setLevel("ERROR")
    return loaded


def _import_quietly(module: str):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN/CPU-feature notices are printed at import, before TF's log level applies;
    # hold stderr while importing and replay it only if the import fails.
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            importlib.import_module("tensorflow")  # even if `module` imports it lazily
            return importlib.import_module(module)
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _config(path: str | None, overrides: tuple[str, ...]):
    from trainer.config import load_config

    if path is not None and is_url(path):
        # TensorFlow reads a gs:// config: imported quietly first, as for any command, or its
        # start-up notices and GCS client warnings would surround a one-line error.
        _load("trainer.storage", _verbose())
    return load_config(path, overrides)


def _verbose() -> bool:
    """`launch -v`, from any command (some take no context object)."""
    context = click.get_current_context(silent=True)
    return bool(context and (context.find_root().obj or {}).get("verbose"))


_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set data.batch_size=256 (repeatable).",
)
_checkpoint_option = click.option(
    "--checkpoint",
    default="latest",
    show_default=True,
    metavar="latest|best|STEP",
    help="Which checkpoint: the latest, the best eval accuracy, or a global step.",
)
_workdir_required = click.option(
    "--workdir",
    required=True,
    type=click.Path(file_okay=False),  # a str: pathlib would turn gs://b into gs:/b
    help="Training workdir (holds config.yaml and checkpoints/): a folder, or a gs:// (any tf.io.gfile) URL.",
)


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_line())
        ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show TensorFlow's own start-up logs.")
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show the version (and TensorFlow's and Keras') and exit.",
)
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Train, evaluate, predict with and export Keras CNNs under tf.distribute."""
    ctx.obj = {"verbose": verbose}


@cli.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Experiment YAML, e.g. configs/quickstart.yaml.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),  # a str: pathlib would turn gs://b into gs:/b
    help="Where checkpoints, logs and config.yaml go: a folder or a gs:// (any tf.io.gfile) URL "
    "[default: runs/<config name>, or runs/<config name>-2, -3, ... when it holds a run of another config].",
)
@_set_option
@click.option("--fresh", is_flag=True, help="Delete this workdir's checkpoints and logs and start over.")
@click.option(
    "--from",
    "start_from",
    metavar="WORKDIR[:latest|best|STEP]",
    help="Start a new run from the model weights of another run's checkpoint (not its optimizer, step or epoch).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Start N local worker processes as one multi-worker cluster (TF_CONFIG is written for each).",
)
@click.option(
    "--profile-steps",
    metavar="START:END",
    help="Trace these global steps with the TensorFlow profiler (sets tensorboard.profile_steps).",
)
@click.option(
    "--tensorboard", "with_tensorboard", is_flag=True, help="Start TensorBoard beside the run and print its URL."
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Make every check a run makes before writing (config, data, model, devices, workdir), print the plan "
    "(steps, data, model, resume or fresh) and exit; writes nothing.",
)
@click.pass_obj
def train(
    obj,
    config_path: str,
    workdir: str | None,
    overrides: tuple[str, ...],
    fresh: bool,
    start_from: str | None,
    workers: int,
    profile_steps: str | None,
    with_tensorboard: bool,
    dry_run: bool,
) -> None:
    """Train a model; resumes from WORKDIR's latest checkpoint if there is one.

    Without --workdir, a config's run is runs/<config name>, or the first of runs/<config name>-2, -3, ... that is
    free or holds this config's run: runs of other settings never resume each other.

    SIGTERM, SIGHUP, SIGUSR1 (Slurm) or Ctrl-C stops after the current step with a checkpoint (exit code 75);
    a second signal exits at once. A NaN/Inf loss stops the run (exit code 3).
    """
    if workdir is not None and not workdir.strip():
        # `--workdir ''` (an unset shell variable) would otherwise mean the default, runs/<config name>.
        raise ConfigError("--workdir is empty (an unset shell variable?); name a folder, or leave --workdir out")
    if profile_steps:
        overrides = (*overrides, f"tensorboard.profile_steps={profile_steps}")
    config = _config(config_path, overrides)
    # One spelling before anything starts (TensorBoard, --workers): file:// -> its path.
    # The default folder (or, in a worker of `--workers N`, its launcher's choice): checked again once held.
    chosen = workdir is None or os.environ.get(_CHOSEN_VARIABLE) == "1"
    if workdir is None:
        workdir = _default_workdir(obj["verbose"], config, config_path, new_run=start_from is not None)
    workdir = workdir_spelling(workdir)
    if dry_run:
        _dry_run(obj["verbose"], config, workdir, fresh, workers, with_tensorboard, start_from)
        return
    server = None
    if with_tensorboard:
        from trainer.launcher import start_tensorboard
        from trainer.storage import join

        server = start_tensorboard(join(workdir, "tensorboard"), echo=click.echo)
    try:
        code = _run_training(
            obj["verbose"], config_path, config, workdir, overrides, fresh, workers, start_from, chosen
        )
    finally:
        if server is not None:
            server.terminate()
    sys.exit(code)


def _default_workdir(verbose: bool, config, config_path: str, new_run: bool) -> str:
    """runs/<config name>, or the -N folder of this config's run (trainer.runs), said in one line.

    Resolved here, once, before anything starts: TensorBoard, the `--workers` and the command
    to resume all name the folder chosen."""
    runs = _load("trainer.runs", verbose)
    choice = runs.default_workdir(config, os.path.join("runs", Path(config_path).stem), new_run=new_run)
    if choice.note:
        click.echo(choice.note)
    return choice.workdir


def _dry_run(
    verbose: bool, config, workdir: str, fresh: bool, workers: int, with_tensorboard: bool, start_from: str | None
) -> None:
    """`train --dry-run`: the plan of this one process; nothing written, nothing started."""
    if workers > 1:
        raise ConfigError(
            "--dry-run checks one process: leave out --workers (each of its workers would make the same checks)"
        )
    if with_tensorboard:
        raise ConfigError("--dry-run starts nothing: leave out --tensorboard")
    planning = _load("trainer.dry_run", verbose)
    for line in planning.plan_run(config, workdir, fresh=fresh, echo=click.echo, start_from=start_from).lines():
        click.echo(line)


def _run_training(
    verbose: bool,
    config_path: str,
    config,
    workdir: str,
    overrides,
    fresh: bool,
    workers: int,
    start_from: str | None,
    chosen: bool = False,
) -> int:
    """One process, or `workers` local processes re-running this command as a cluster.

    The command to resume names the workdir and leaves --from out: a stopped run resumes
    from its own checkpoint."""
    resume = shlex.join(
        ["launch", "train", "--config", config_path, "--workdir", str(workdir)]
        + [word for override in overrides for word in ("--set", override)]
        + (["--workers", str(workers)] if workers > 1 else [])
    )
    if workers > 1:
        from trainer.launcher import run_local_workers

        command = [sys.executable, "-m", "launch", *(["-v"] if verbose else []), "train"]
        command += ["--config", config_path, "--workdir", str(workdir), *(["--fresh"] if fresh else [])]
        command += ["--from", start_from] if start_from is not None else []
        for override in (*overrides, "runtime.strategy=multi_worker"):
            command += ["--set", override]
        env = {_RESUME_VARIABLE: resume, **({_CHOSEN_VARIABLE: "1"} if chosen else {})}
        return run_local_workers(command, workers, echo=click.echo, env=env)
    training = _load("trainer.training", verbose)
    resume = os.environ.get(_RESUME_VARIABLE) or resume  # a worker of `--workers N` says what to rerun
    return training.train(
        config,
        workdir,
        fresh=fresh,
        echo=click.echo,
        resume_command=resume,
        start_from=start_from,
        chosen_workdir=chosen,
    ).exit_code


# The command a `--workers N` launcher was started with, passed to its workers so that
# their "resume with:" line names it (and not their own `--set runtime.strategy=...`).
_RESUME_VARIABLE = "TRAINER_RESUME_COMMAND"
# Set for the workers of a `--workers N` launcher that chose the workdir itself (no
# --workdir): their chief checks the choice again once it holds the workdir (trainer.runs).
_CHOSEN_VARIABLE = "TRAINER_CHOSEN_WORKDIR"


@cli.command()
@_workdir_required
@_checkpoint_option
@_set_option
@click.pass_obj
def evaluate(obj, workdir: str, checkpoint: str, overrides: tuple[str, ...]) -> None:
    """Test accuracy and per-class accuracy of a checkpoint; writes WORKDIR/metrics.json.

    While a trainer is running in WORKDIR, metrics.json is the trainer's: the result goes
    to WORKDIR/metrics-evaluate.json instead.
    """
    inference = _load("trainer.inference", obj["verbose"])
    evaluation = _load("trainer.evaluation", obj["verbose"])
    metrics = inference.evaluate(workdir, overrides, checkpoint=checkpoint, warn=_warn)
    click.echo(evaluation.format_metrics(metrics))  # shown before saving: a failed save loses nothing
    path, busy = inference.save_metrics(workdir, metrics)
    if busy:
        click.echo(f"A trainer is using {workdir}, and metrics.json is its file: wrote {path} instead")
    else:
        click.echo(f"Wrote {path}")


def _warn(line: str) -> None:
    """Warnings of commands whose standard output is data go to standard error."""
    click.echo(line, err=True)


@cli.command()
@_workdir_required
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image with all class probabilities.")
@_checkpoint_option
@click.pass_obj
def predict(obj, workdir: str, images: tuple[str, ...], as_json: bool, checkpoint: str) -> None:
    """Classify image files: one line per image with path, class and probability.

    The lines are tab-separated; a path holding a tab or line break needs --json.
    """
    if not as_json:
        for image in images:
            if "\t" in image or "\n" in image or "\r" in image:
                raise DataError(
                    f"image path {image[:80]!r} holds a tab or line break, which would break the tab-separated "
                    "output; use --json (or rename the file)"
                )
    inference = _load("trainer.inference", obj["verbose"])
    for prediction in inference.predict(workdir, images, checkpoint=checkpoint, warn=_warn):
        if as_json:
            click.echo(json.dumps(vars(prediction)))
        else:
            click.echo(f"{prediction.path}\t{prediction.label}\t{prediction.probability:.4f}")


@cli.command()
@_workdir_required
@_checkpoint_option
@click.option(
    "--format",
    "format_names",
    default=",".join(export_formats.DEFAULT_FORMATS),
    show_default=True,
    metavar="NAMES",
    help=f"Comma-separated, any of: {', '.join(export_formats.FORMATS)}. "
    f"onnx needs the export extra ({export_formats.INSTALL_EXTRA}), which also holds the runtimes that load "
    "tflite and onnx files.",
)
@click.pass_obj
def export(obj, workdir: str, checkpoint: str, format_names: str) -> None:
    """Write the model into WORKDIR/export/: model.keras and a SavedModel that tf.saved_model.load
    serves, and with --format also model.tflite (LiteRT) and model.onnx (onnxruntime).
    All take 0-255 float32 pixels and give float32 class probabilities; labels.txt names them.
    export/ is replaced whole: it holds only the formats of the latest export."""
    formats = export_formats.parse_formats(format_names)  # a typo ends here, before TensorFlow starts
    inference = _load("trainer.inference", obj["verbose"])
    paths = inference.export(workdir, checkpoint=checkpoint, warn=_warn, formats=formats)
    written = [str(paths[name]) for name in formats]
    listed = ", ".join(written[:-1]) + " and " + written[-1] if len(written) > 1 else written[0]
    click.echo(f"Exported step {paths['step']}: {listed} (labels in {paths['labels']})")


@cli.group()
def data() -> None:
    """Look at the data a config feeds."""


@data.command("show")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@click.option("--augmented", is_flag=True, help="Show the images after training augmentation (epoch 0).")
@click.option("--count", default=32, show_default=True, type=click.IntRange(1, 1024), help="How many images.")
@_set_option
@click.pass_obj
def data_show(obj, config_path: str, out: Path, augmented: bool, count: int, overrides: tuple[str, ...]) -> None:
    """Write a labelled grid of training images (the seed paper's "plot some images")."""
    config = _config(config_path, overrides)
    visualize = _load("trainer.visualize", obj["verbose"])
    click.echo(f"Wrote {visualize.show_samples(config, out, count=count, augmented=augmented)}")


@data.command("convert")
@click.option("--from", "source", required=True, help="Image folder: train/<class>/ + test/<class>/, or <class>/.")
@click.option("--to", "out", required=True, help="New folder for the shards (local, gs://, any tf.io.gfile URL).")
@click.option(
    "--shard-size", default=100.0, show_default=True, type=click.FloatRange(0.001, 10_000), help="MB per shard."
)
@click.option(
    "--validation-split",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="For one <class>/ tree: the fraction of each class held out as the test split.",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**31 - 1), help="Chooses that split.")
@click.pass_obj
def data_convert(obj, source: str, out: str, shard_size: float, validation_split: float, seed: int) -> None:
    """Write an image folder as TFRecord shards (image/encoded, image/class/label) + labels.txt,
    to train from with data.source=tfrecord, e.g. after copying them to cloud storage."""
    converter = _load("trainer.data.convert", obj["verbose"])
    index = converter.convert(source, out, shard_size, validation_split, seed, progress=click.echo)
    counts = {name: sum(index[name]["counts"]) for name in ("train", "test")}
    shards = {name: len(index[name]["shards"]) for name in ("train", "test")}
    click.echo(
        f"Wrote {counts['train']} train records in {shards['train']} shard(s) and {counts['test']} test records in "
        f"{shards['test']} shard(s) to {out}; train with --set data.source=tfrecord --set data.path={out}"
    )


@data.command("serve")
@click.option("--dispatcher", "is_dispatcher", is_flag=True, help="Start a tf.data service dispatcher.")
@click.option("--worker", "dispatcher", default=None, metavar="DISPATCHER", help="Start a worker for host:port.")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--host", default="", help="Worker: the name trainers reach it by (a pod's DNS name); default localhost.")
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0, 3600, min_open=True),
    help="Worker: seconds for its dispatcher to answer, else one Error line and exit 2.",
)
@click.pass_obj
def data_serve(obj, is_dispatcher: bool, dispatcher: str | None, port: int, host: str, timeout: float) -> None:
    """Serve training batches for data.service: a dispatcher, or a worker of one, until
    SIGTERM, SIGINT, SIGHUP or SIGUSR1 (exit 0). Prints one line with the server's address. A worker
    whose dispatcher does not answer within --timeout: one Error line, exit 2; a signal
    before the server serves: exit 128+N (trainer.data.service.serve_worker)."""
    if is_dispatcher == (dispatcher is not None):
        raise ConfigError("launch data serve: give --dispatcher or --worker DISPATCHER (one of them)")
    service = _load("trainer.data.service", obj["verbose"])
    say = lambda line: click.echo(line) or sys.stdout.flush()
    if is_dispatcher:
        service.serve_dispatcher(port, say)
    else:
        service.serve_worker(dispatcher, port, host, say, timeout)


@cli.command()
@_set_option
@click.pass_obj
def devices(obj, overrides: tuple[str, ...]) -> None:
    """What TensorFlow sees, and the strategy, replicas and precision `auto` picks."""
    config = _config(None, overrides)
    runtime = _load("trainer.runtime", obj["verbose"])
    report = runtime.describe_devices(config.runtime)
    click.echo(f"TensorFlow {report['tensorflow']}, Keras {report['keras']}")
    for device in report["devices"]:
        extra = ", ".join(f"{k}={v}" for k, v in device.items() if k not in ("name", "type"))
        click.echo(f"  {device['type']:<4} {device['name']}" + (f" ({extra})" if extra else ""))
    click.echo(
        f"Strategy: {report['strategy']} with {report['replicas']} replica(s) on {report['workers']} worker(s); "
        f"precision {report['precision']}; XLA {'on' if report['jit_compile'] else 'off'}"
    )
    click.echo(f"Why: {report['reason']}")


@cli.command()
@click.option("--size", default=224, show_default=True, type=click.IntRange(32, 1024), help="Image size to measure at.")
@click.option("--classes", default=10, show_default=True, type=click.IntRange(2, 100_000), help="Classes of the head.")
@click.pass_obj
def models(obj, size: int, classes: int) -> None:
    """List every model.name with its parameters and forward FLOPs per image."""
    library = _load("trainer.models", obj["verbose"])
    click.echo(f"{'model.name':<20} {'from':<37} {'parameters':>11} {'GFLOPs/image':>13}  (at {size}x{size})")
    for row in library.describe_models(size, classes):
        click.echo(f"{row.name:<20} {row.origin:<37} {row.parameters / 1e6:>10.2f}M {row.forward_flops / 1e9:>13.3f}")
    click.echo("Backbones: set model.weights (none | imagenet | a .keras/.h5 file); see the README's Models section")


@cli.group("config")
def config_group() -> None:
    """Inspect configs."""


@config_group.command("show")
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="Experiment YAML [default: built-in defaults]."
)
@_set_option
def config_show(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (YAML) after overrides."""
    from trainer.config import to_yaml

    click.echo(to_yaml(_config(config_path, overrides)), nl=False)


@config_group.command("keys")
def config_keys() -> None:
    """List every config key with its type, default and meaning (and its choices)."""
    from trainer.config import describe_keys

    rows = [(row.key, row.kind, repr(row.default), row.meaning, row.choices) for row in describe_keys()]
    head = ("key", "type", "default")
    widths = [max(len(head[column]), *(len(row[column]) for row in rows)) for column in range(3)]
    for key, kind, default, meaning, choices in [(*head, "meaning", ()), *rows]:
        line = "  ".join(text.ljust(width) for text, width in zip((key, kind, default), widths))
        click.echo(f"{line}  {meaning}" + (f" [{' | '.join(choices)}]" if choices else ""))


def main() -> None:
    cli(prog_name="launch")
