"""The training loop, after Orbit: a compiled inner step kept apart from a plain-Python
controller that decides what happens between calls.

- `step`: the compiled call (up to steps_per_loop steps of strategy.run); knows no files.
- `schedule`: what is due at a global step; pure, no TensorFlow.
- `actions`: one callable per side effect between calls (logging, evaluation, saves, ...).
- `controller`: the worker thread, the stop request, the calls, the actions in order.
- `phases`: the compiled call of each fine-tuning phase; `run`: a run's parts, passed whole.
- `build`: wires a run's parts into all of the above; `user_actions`: the train.actions of a
  config (the user's code, by import path), called with a read-only view of each window.

A new side effect (evaluate every N minutes, save on SIGUSR1) is a callable in `actions`
and one entry in `build`'s list: the controller and the step do not change.
"""
