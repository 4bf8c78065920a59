"""What a run says about itself: where it resumes, why there is nothing to do, why it stopped,
and the closing table.

These lines are the run's interface with the person who started it (tests assert them
word for word), so they are written in one place, apart from the assembly in
trainer.training that decides when each is due. The console (trainer.console) decides
who sees them: the chief everything, the other workers only their stop.
"""

from __future__ import annotations

from trainer.console import summary_table
from trainer.loop.actions import LoopState
from trainer.loop.controller import TrainResult
from trainer.loop.run import Run


def announce_resume(run: Run, step: int, changed: str | None = None) -> None:
    """Where the run resumes, which settings changed since (`changed`: trainer.runs.record_config's
    line), and that the global batch (so the data stream) survives a new replica count."""
    per_epoch, replicas = run.parts.per_epoch, run.runtime.num_replicas
    run.console.info(
        f"Resuming from {run.store.restored_path} at step {step} (epoch {step // per_epoch + 1}, "
        f"step {step % per_epoch}/{per_epoch} of it); use --fresh to start over"
    )
    if changed:
        run.console.info(changed)
    if run.store.restored_replicas and run.store.restored_replicas != replicas:
        run.console.info(
            f"The checkpoint was written with {run.store.restored_replicas} replica(s), this run has {replicas}; "
            f"the global batch stays {run.config.data.batch_size}, so training continues on the same data stream"
        )


def nothing_to_do(run: Run, step: int) -> str:
    """A workdir already trained as far as the config asks: how to ask for more (naming the
    workdir: without --workdir, a config with more epochs is another run, in another folder)."""
    return (
        f"Already trained to step {step} of {run.parts.total_steps}; nothing to do (to train on, raise "
        f"train.epochs with --workdir {run.wd.root}; to start over, use --fresh)"
    )


def stopped(run: Run, result: TrainResult, resume_command: str | None) -> str:
    """Why and where a run stopped, and how to resume it (every worker says it: each may stop alone)."""
    how = f"resume with: {resume_command}" if resume_command else "run the same command to resume"
    if run.wd.in_memory:
        how = "it is in memory (ram://) and vanishes when this process exits"
    return (
        f"Stopped by {result.stopped_by} at step {result.step} of {run.parts.total_steps} "
        f"(epoch {result.step // run.parts.per_epoch + 1}); checkpoint saved in {run.wd.checkpoints}; {how}"
    )


def summary(run: Run, result: TrainResult, state: LoopState) -> str:
    """The closing table: results, speed and where everything is."""
    rows = [("steps", f"{result.step} of {result.total_steps} (global batch {run.config.data.batch_size})")]
    if result.final_eval is not None:
        final = result.final_eval
        detail = (
            f"with eval.tta={run.config.eval.tta}, {state.single_view_accuracy:.2%} single view"
            if state.single_view_accuracy is not None
            else f"(loss {final.loss:.4f})"
        )
        rows.append(("final test accuracy", f"{final.accuracy:.2%} {detail}"))
    if state.best_step is not None:
        rows.append(("best test accuracy", f"{state.best_accuracy:.2%} at step {state.best_step}"))
    wd = run.wd
    rows += [
        ("time", f"{result.seconds:.0f}s in all"),
        ("speed", f"{result.images_per_second:.0f} img/s over {run.runtime.num_replicas} replica(s)"),
        ("checkpoints", str(wd.checkpoints)),
        ("metrics", str(wd.metrics_path)),
    ]
    if wd.in_memory:  # no later command can reach this process's memory
        rows.append(("workdir", "in memory (ram://): it vanishes when this process exits"))
    else:
        rows += [
            ("export", f"launch export --workdir {wd.root}"),
            ("TensorBoard", f"tensorboard --logdir {wd.tensorboard}"),
        ]
    return summary_table(rows)
