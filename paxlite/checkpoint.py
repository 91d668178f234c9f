"""Orbax checkpoints in `run.dir/checkpoints`: asynchronous saves, keep-N, resharding restore,
and a manifest that makes damaged checkpoints detectable.

A checkpoint holds the train state (parameters, optimizer state, step) as sharded arrays,
and small JSON items (the data loader's position, the loop's fault counters). Restoring takes
abstract arrays carrying the *current* shardings, so a run saved on one mesh restores onto
any other mesh: Orbax reads each device's slice directly.

Orbax writes a checkpoint into `N.orbax-checkpoint-tmp` and renames it to `N` when every
process is done, so a killed write never looks finished. It does not notice a finished
checkpoint damaged later (a truncated file, a lost metadata file, a flipped bit restores
silently or fails deep inside TensorStore). So just before that rename, paxlite writes
`paxlite_manifest.json` into the directory: every file's size and sha256. Restoring checks
the manifest first, then the arrays' shapes against the config, then reads; a checkpoint
that fails is reported with its path, moved to `run.dir/corrupt_checkpoints/` and the next
older one is tried. Nothing here unpickles: arrays are TensorStore, the rest JSON.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from paxlite.config import CheckpointConfig, ConfigError

MANIFEST = "paxlite_manifest.json"
# Top-level files Orbax itself rewrites after the manifest is written (commit time stamps).
_UNLISTED = {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a checkpoint being written
JSON_ITEMS = ("data", "loop")  # data loader position, the loop's fault counters


# Orbax's replica-parallel save has every replica of an array (its copies over data, or over
# fsdp for a replicated leaf) write a slice of it, so that a large array's write is spread over
# the processes. Slicing is a jax program per array shape, compiled at the first save; for a
# slice under this size that costs more than it spreads, and replica 0 writes the array whole.
# A tiny model's state on 8 CPU devices (benchmarks/checkpoint_saves.py): the first save
# 2.6 s -> 0.17 s, later ones 0.19-0.33 s -> 0.12-0.15 s. A 1.7B model's kernels (8-32 MiB a
# slice at data=2) are still written in slices.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The train state's handler: Orbax's PyTree handler, its jax.Array writes replica-parallel
  only for slices of MIN_REPLICA_SLICE_BYTES or more (where this Orbax has the option)."""
  th = ocp.type_handlers
  try:  # the per-array metadata Orbax's default handler keeps; Orbax names its store only here
    from orbax.checkpoint._src.metadata.array_metadata_store import Store
  except ImportError:
    Store = None
  if Store is None or "min_slice_bytes_for_replica_parallel" not in inspect.signature(th.ArrayHandler).parameters:
    return ocp.PyTreeCheckpointHandler()  # Orbax < 0.11.30: replica-parallel throughout
  arrays = th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES, array_metadata_store=Store())
  scalar = th.ScalarHandler()
  registry = th.create_type_handler_registry(
      (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar), (np.ndarray, th.NumpyHandler()),
      (str, th.StringHandler()), (jax.Array, arrays))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (disk full, unwritable directory); one line."""


def _one_line(e: BaseException, limit: int = 400) -> str:
  """The error as one line; when long, its head and its tail (where TensorStore puts the OS
  error), and the OS error's description (TensorStore's `os_error_code='27'`: File too large)
  when the cut left it out."""
  text = " ".join(str(e).split()) or type(e).__name__
  short = text if len(text) <= limit else f"{text[:limit // 3]} ... {text[-2 * limit // 3:]}"
  codes = re.findall(r"os_error_code='?(\d+)", text)
  reason = os.strerror(int(codes[-1])) if codes else None
  return short if reason is None or reason in short else f"{short} [{reason}]"


def _report(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: str, step: int, checksum: bool = True) -> None:
  """Lists every file under a written checkpoint directory with its size (and sha256)."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel in _UNLISTED:
        continue
      entry: dict[str, Any] = {"bytes": os.path.getsize(path)}
      if checksum:
        entry["sha256"] = _sha256(path)
      files[rel] = entry
  if not files:
    raise CheckpointError(f"checkpoint '{directory}' holds no files to seal")
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"step": step, "files": dict(sorted(files.items()))}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, MANIFEST))


def check_manifest(directory: str, checksum: bool = True) -> str | None:
  """None if every file the manifest lists is there, whole (and unaltered); else what is wrong."""
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
  except FileNotFoundError:
    return f"{MANIFEST} is missing (the write did not finish, or not written by paxlite)"
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{MANIFEST} is unreadable ({_one_line(e)})"
  for rel, entry in files.items():
    full = os.path.join(directory, rel)
    try:
      size = os.path.getsize(full)
    except OSError:
      return f"{rel} is missing"
    if size != entry["bytes"]:
      return f"{rel} has {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)"
    if checksum and "sha256" in entry and _sha256(full) != entry["sha256"]:
      return f"{rel} does not match its sha256 checksum (the file was altered)"
  return None


# ---------------------------------------------------------------------------------------
# Shapes: a checkpoint from another config is a config mistake, not a damaged checkpoint
# ---------------------------------------------------------------------------------------


def _key(entry: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def _shapes(tree: Any) -> dict[tuple[Any, ...], tuple[int, ...]]:
  """Leaf path -> shape, with dict keys, sequence indices and attribute names alike
  (Orbax's metadata stores optax's named tuples as dicts)."""
  return {tuple(_key(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def compare_shapes(saved: Any, expected: Any, where: str) -> None:
  """Raises ConfigError naming the first array whose presence or shape differs."""
  have, want = _shapes(saved), _shapes(expected)
  for path in sorted(set(have) | set(want), key=lambda p: (p[:1] != ("params",), str(p))):  # params first
    name = "/".join(map(str, path))
    if path not in have:
      raise ConfigError(f"run.dir: {where} has no array '{name}' that this config needs; "
                        f"resume with the config the run was started with, or use a new run.dir")
    if path not in want:
      raise ConfigError(f"run.dir: {where} holds an array '{name}' this config does not have; "
                        f"resume with the config the run was started with, or use a new run.dir")
    if have[path] != want[path]:
      raise ConfigError(f"run.dir: {where} holds '{name}' with shape {have[path]}, this config gives "
                        f"{want[path]}; resume with the config the run was started with, or use a new run.dir")


# ---------------------------------------------------------------------------------------
# The checkpointer
# ---------------------------------------------------------------------------------------


class Checkpointer:
  """Saves and restores one run's checkpoints; see the module docstring for the guarantees."""

  def __init__(self, run_dir: str, cfg: CheckpointConfig, report: Callable[[str], None] = _report):
    self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    self.quarantine = os.path.abspath(os.path.join(run_dir, "corrupt_checkpoints"))
    self._checksum = cfg.verify
    self._async = cfg.async_save
    self._report = report
    self._writing: int | None = None  # the step whose background write is in flight
    # Always Orbax's asynchronous checkpointer: its post-finalization callback (run on the
    # primary process once every process has written, before the rename) seals the manifest
    # into the checkpoint. async_save=false simply waits for each write.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        enable_async_checkpointing=True,
        create=False,  # nothing is written into run.dir until the first save
        cleanup_tmp_directories=True,  # the remains of a write killed half-way
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
    )
    # The PyTree handler (not the Standard one) so that `restore_params` can read the
    # parameters alone (partial restore); both write the same format.
    handlers = {"state": _state_handler(), **{n: ocp.JsonCheckpointHandler() for n in JSON_ITEMS}}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self.last_saved: int | None = self._manager.latest_step()  # newest complete step

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- saving ----------------------------------------------------------------------------

  def _seal(self) -> None:
    step = self._writing
    candidates = glob.glob(os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*")) + [self.path(step)]
    found = next((c for c in candidates if os.path.isdir(c)), None)
    if found is None:
      raise CheckpointError(f"checkpoint {step}: no directory to seal under '{self.directory}'")
    write_manifest(found, step, checksum=self._checksum)

  def _failed(self, step: int | None, e: BaseException) -> CheckpointError:
    intact = f"step {self.last_saved} is the latest complete checkpoint" if self.last_saved is not None \
        else "no earlier checkpoint exists"
    what = f"step {step}" if step is not None else "a checkpoint"
    return CheckpointError(f"checkpoint {what} could not be written to '{self.directory}' "
                           f"({_one_line(e)}); {intact}")

  def save(self, step: int, state: Any, items: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Starts writing `state` (and JSON `items`) at `step`; True if it saves. Raises
    CheckpointError when this write, or the previous background one, fails."""
    self.wait()  # one write at a time: the manifest callback knows which step it seals
    if step == self.last_saved:
      return False
    self._check_space(step, state)
    args = {"state": ocp.args.PyTreeSave(state)}
    for name, value in (items or {}).items():
      if value is not None:
        args[name] = ocp.args.JsonSave(value)
    self._writing = step
    try:
      os.makedirs(self.directory, exist_ok=True)
      saved = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # noqa: BLE001 - OSError, TensorStore and Orbax errors alike
      self._writing = None
      raise self._failed(step, e) from e
    if not saved:
      self._writing = None
    elif not self._async:
      self.wait()
    return saved

  def _check_space(self, step: int, state: Any) -> None:
    """Refuses a write the disk visibly cannot hold, before it starts (a full disk found half
    way through a write fails too, only later and less clearly)."""
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    try:
      free = shutil.disk_usage(self.directory if os.path.isdir(self.directory) else os.path.dirname(self.directory)).free
    except OSError:
      return  # nothing to measure yet; the write itself will tell
    if free < need:
      raise self._failed(step, OSError(f"the state needs {need / 2**20:.1f} MiB, the disk has {free / 2**20:.1f} MiB free"))

  def check(self) -> None:
    """Raises CheckpointError now if a background write has already failed (cheap)."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      step, self._writing = self._writing, None
      raise self._failed(step, e) from e

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

  def restore_items(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    """Reads only the train-state items `abstract` names, e.g. {'params': ..., 'fp8': ...}
    (Orbax partial restore: the optimizer state is never read), onto the shardings the
    abstract arrays carry."""
    args = _pytree_restore(abstract, partial_restore=True)
    return self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]

  def wait(self) -> None:
    """Blocks until the background write is complete; CheckpointError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      step, self._writing = self._writing, None
      raise self._failed(step, e) from e
    if self._writing is not None:
      self.last_saved, self._writing = self._writing, None

  def close(self) -> None:
    self.wait()
    self._manager.close()

  # -- restoring -------------------------------------------------------------------------

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest (or the given) checkpoint that passes every check, onto the
    shardings `abstract_state` carries. Returns (step, state, JSON items) or None when there
    is no checkpoint. Damaged checkpoints are reported, moved aside, and skipped; a
    checkpoint of another model is a ConfigError."""
    self.wait()
    if step is not None and step not in self.all_steps():
      raise ConfigError(f"run.dir: no checkpoint {step} in '{self.directory}' (there are {self.all_steps()})")
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    moved = []
    for s in steps:
      where = f"checkpoint '{self.path(s)}'"
      problem = check_manifest(self.path(s), self._checksum)
      restored = None
      if problem is None:
        try:
          saved = self._manager.item_metadata(s)["state"]
        except Exception as e:  # noqa: BLE001
          saved, problem = None, f"its metadata is unreadable ({_one_line(e)})"
        if saved is not None:
          compare_shapes(saved, abstract_state, where)
        elif problem is None:  # Orbax found the item but could not read what it holds
          problem = "its metadata is unreadable (state/_METADATA)"
      if problem is None:
        try:
          restored = self._read(s, abstract_state)
        except Exception as e:  # noqa: BLE001 - TensorStore raises bare Exceptions
          problem = f"it cannot be read ({_one_line(e)})"
      if problem is None:
        self.last_saved = s
        return s, restored[0], restored[1]
      moved.append(self._set_aside(s))
      self._report(f"paxlite: {where} is damaged: {problem}; moved to '{moved[-1]}'"
                   + (", trying the previous one" if s != steps[-1] else ""))
    if moved:
      raise ConfigError(f"run.dir: no usable checkpoint in '{self.directory}': the damaged ones were moved "
                        f"to '{self.quarantine}'; rerun to start again from step 0")
    return None

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    present = set(self._manager.item_metadata(step).keys())
    args = {"state": _pytree_restore(abstract_state)}
    args.update({n: ocp.args.JsonRestore() for n in JSON_ITEMS if n in present})
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], {n: restored[n] for n in JSON_ITEMS if n in present}

  def _set_aside(self, step: int) -> str:
    """Moves a damaged checkpoint out of Orbax's sight (a later save may reuse its step)."""
    dest = os.path.join(self.quarantine, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(self.quarantine, exist_ok=True)
      shutil.move(self.path(step), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"paxlite_set_aside_{step}")
    self._manager.reload()
    return dest


def _pytree_restore(abstract: Any, **kwargs: Any) -> Any:
  """Restore arguments reading each array straight into the sharding `abstract` carries."""
  return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                **kwargs)


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or abstract arrays) with the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a.b.c': shape} for every leaf of a nested dict of arrays, ShapeDtypeStructs or metadata."""
  return {".".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
