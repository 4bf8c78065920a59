"""An action of your own, named in a config as `train.actions: [my_actions:metrics_log]`.

The contract (README "Python API"): the trainer calls the factory once per run, on the
chief, with a trainer.RunInfo (a copy of the config, the workdir, the step it starts from,
the steps it ends at); the factory returns the action, which the trainer calls as
`action(step, metrics)` with a trainer.StepMetrics at every logging window, after that
window's evaluation and checkpoint. It sees numbers only, so it cannot change the run; if
it raises, the run stops with a message naming it, and the same command resumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# Every call of this process, for a notebook to look at after trainer.train() returns.
HISTORY: list[dict] = []


def metrics_log(run):
    """Append each window's numbers to WORKDIR/metrics_log.jsonl (a local workdir) and HISTORY."""
    path = Path(run.workdir) / "metrics_log.jsonl"

    def action(step, metrics):
        record = dataclasses.asdict(metrics)
        HISTORY.append(record)
        with path.open("a") as log:
            log.write(json.dumps(record) + "\n")

    return action
