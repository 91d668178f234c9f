"""Orbax checkpoints in `run.dir/checkpoints`: asynchronous saves, keep-N, resharding restore.

A checkpoint holds the train state (parameters, optimizer state, step) as sharded arrays,
and the data loader's position as JSON. Restoring takes abstract arrays carrying the
*current* shardings, so a run saved on one mesh restores onto any other mesh: Orbax reads
each device's slice directly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from paxlite.config import CheckpointConfig


class Checkpointer:

  def __init__(self, run_dir: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None, force: bool = False) -> bool:
    """Starts writing `state` at `step` (in the background when async); True if it saves."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(data_state)
    return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any] | None]:
    """Reads `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    item_names = set(self._manager.item_metadata(step).keys()) if hasattr(self._manager, "item_metadata") else {"state", "data"}
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if "data" in item_names:
      args["data"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], restored.get("data") if "data" in item_names else None

  def stored_param_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{'blocks.attn.q.kernel': shape, ...} of the parameters saved at `step`, read from the
    checkpoint's metadata alone (no array is read)."""
    from etils import epath

    handler = ocp.PyTreeCheckpointHandler()
    try:
      meta = handler.metadata(epath.Path(self.directory) / str(step) / "state")
    finally:
      handler.close()
    return flat_shapes(getattr(meta, "tree", meta)["params"])

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Reads only the parameters of `step` (Orbax partial restore: the optimizer state is
    never read) onto the shardings carried by `abstract_params`."""
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or abstract arrays) with the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a.b.c': shape} for every leaf of a nested dict of arrays, ShapeDtypeStructs or metadata."""
  return {".".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
