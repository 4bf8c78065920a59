"""The training loop: compiled step, schedule, actions between calls, controller."""
