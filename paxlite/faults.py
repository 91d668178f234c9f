"""What a run does when something goes wrong: non-finite steps and stop signals.

  * `guard_update` runs inside the jitted step: an update whose loss or gradient norm is not
    finite never reaches the parameters or the optimizer state (a select, no host sync).
  * `LoopCounters` is the host's record of non-finite steps and of batches left out after a
    rollback; it is saved in every checkpoint (JSON) so a resumed run keeps leaving them out.
  * `StopSignals` turns SIGTERM (what SLURM, Kubernetes and TPU/GPU preemption send) and
    SIGINT into a flag the loop reads between steps: finish the step, save, exit.

The policy itself (skip, rollback, stop; `train.on_nan`) is the loop's, in trainer.py.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp

class NonFiniteError(RuntimeError):
  """Training stopped on a non-finite loss or gradient (train.on_nan=stop, or train.nan_limit)."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def guard_update(finite: jax.Array, new_state: dict[str, Any], old_state: dict[str, Any]) -> dict[str, Any]:
  """`new_state` with params and opt_state taken from `old_state` where `finite` is False.

  Everything else (the step counter, a loss scale) comes from `new_state`: the step still
  counts, and a loss scaler must see its overflow to shrink. XLA fuses the select into the
  optimizer's element-wise update, so it costs no extra pass over the weights.
  """
  keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
  return {**new_state,
          "params": jax.tree.map(keep, new_state["params"], old_state["params"]),
          "opt_state": jax.tree.map(keep, new_state["opt_state"], old_state["opt_state"])}


def is_finite(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
  """One flag for a step: any inf/NaN gradient makes the global norm inf/NaN."""
  return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


@dataclasses.dataclass
class LoopCounters:
  nan_steps: int = 0
  """Non-finite steps seen by this run, whatever the policy did about them."""
  in_a_row: int = 0
  """Non-finite steps in a row (skip), or rollbacks since the last new checkpoint (rollback)."""
  skipped_batches: set[int] = dataclasses.field(default_factory=set)
  """Global batch indices the loader passes over (left out by rollbacks)."""

  def to_json(self) -> dict[str, Any]:
    return {"nan_steps": self.nan_steps, "in_a_row": self.in_a_row, "skipped_batches": sorted(self.skipped_batches)}

  @classmethod
  def from_json(cls, data: dict[str, Any] | None) -> LoopCounters:
    data = data or {}
    return cls(int(data.get("nan_steps", 0)), int(data.get("in_a_row", 0)),
               {int(i) for i in data.get("skipped_batches", ())})


class StopSignals:
  """Within `with StopSignals() as stop:`, SIGTERM and SIGINT set `stop.received` (the
  signal's name) instead of killing the process; the loop finishes its step, saves and
  returns. A second signal gets the previous handler (so a second Ctrl-C interrupts at once).

  Handlers can only be installed from the main thread; elsewhere this is inert. With several
  processes nothing is installed: JAX's preemption notifier (set up by jax.distributed) owns
  SIGTERM, and `should_stop(step)` asks it for the step every process agrees to stop at.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1

  def __enter__(self) -> StopSignals:
    # Several processes must stop at the same step: only JAX's notifier can agree on one.
    if threading.current_thread() is threading.main_thread() and not self._multi:
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    self.received = signal.Signals(signum).name
    signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """True once a stop signal arrived (with several processes: at the agreed step)."""
    if self.received is None and self._multi:
      from jax.experimental import multihost_utils

      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.received = "SIGTERM"
      except RuntimeError:  # no preemption service (jax.distributed not initialised)
        pass
    return self.received is not None
