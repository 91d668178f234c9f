"""Save times of a tiny model's train state on 8 simulated CPU devices (data 2, fsdp 2,
tensor 2), with Orbax's default PyTree handler against paxlite's (`checkpoint._state_handler`:
replica-parallel writes only for slices of 1 MiB or more). Each handler in a fresh process,
since the first save compiles the slicing programs (benchmarks/RESULTS.md, session 12).

  python benchmarks/checkpoint_saves.py            # both, alternating, twice
  python benchmarks/checkpoint_saves.py orbax      # one handler, this process
"""

import dataclasses
import os
import subprocess
import sys
import tempfile
import time

if len(sys.argv) == 1:
  for which in ("orbax", "paxlite") * 2:
    subprocess.run([sys.executable, __file__, which], check=True)
  sys.exit(0)

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from paxlite import checkpoint  # noqa: E402
from paxlite.config import load_config  # noqa: E402
from paxlite.trainer import Trainer  # noqa: E402

cfg = load_config("configs/tiny.yaml", ["model.num_layers=4", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                        "data.source=synthetic", "run.compile_cache=none"])
with tempfile.TemporaryDirectory() as run_dir:
  trainer = Trainer(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=run_dir)))
  state = trainer.init_state()
  handler = checkpoint._state_handler() if sys.argv[1] == "paxlite" else ocp.PyTreeCheckpointHandler()
  manager = ocp.CheckpointManager(os.path.join(run_dir, "ckpt"), item_handlers={"state": handler},
                                  options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True))
  times = []
  for step in range(5):
    start = time.perf_counter()
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    manager.wait_until_finished()
    times.append(time.perf_counter() - start)
  leaves = jax.tree.leaves(state)
  mib = sum(a.nbytes for a in leaves) / 2**20
  print(f"{sys.argv[1]:8s} {len(leaves)} arrays, {mib:.1f} MiB: saves " + " ".join(f"{t:.3f}" for t in times) + " s")
