"""The cost model's memory per device against the peaks `paxlite bench` measured on H200s
(benchmarks/RESULTS.md, the rounds named), on the CPU: no GPU needed.

  PYTHONPATH=. python benchmarks/costmodel_vs_measured.py

Prints, per measured run, `costmodel.estimate(...).memory` (GPU hardware defaults), the
measured peak and the error, then the mean absolute error.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from paxlite.config import load_config  # noqa: E402
from paxlite.costmodel import default_hardware, estimate  # noqa: E402
from paxlite.plan import planning_config  # noqa: E402

B17, B13 = "configs/bench-1.7b.yaml", "configs/bench-13b.yaml"
UNROLLED_OPERANDS = {"model.scan_layers": False, "model.remat": "operands_saveable"}
# (config, overrides, (data, fsdp, stage, tensor), measured peak GB, round)
MEASURED = [
    (B17, {"train.batch_size": 32}, (4, 1, 1, 1), 54.3, 9),
    (B17, {"train.batch_size": 32}, (1, 4, 1, 1), 34.6, 9),
    (B17, {"train.batch_size": 16}, (1, 2, 1, 2), 21.6, 9),
    (B17, {"train.batch_size": 16, "pipeline.schedule": "gpipe", "pipeline.microbatches": 8}, (1, 1, 2, 2), 14.2, 9),
    (B13, {"train.batch_size": 16}, (1, 4, 1, 1), 96.9, 9),
    (B13, {"train.batch_size": 8}, (1, 2, 1, 2), 80.3, 9),
    (B17, UNROLLED_OPERANDS, (1, 1, 1, 1), 61.11, 26),
    (B17, {"model.remat": "operands_saveable"}, (1, 1, 1, 1), 66.81, 25),
    (B17, {"model.remat": "full"}, (1, 1, 1, 1), 32.59, 26),
    (B17, {**UNROLLED_OPERANDS, "train.batch_size": 16}, (2, 1, 1, 1), 60.90, 25),
    (B17, {**UNROLLED_OPERANDS, "train.batch_size": 16}, (1, 2, 1, 1), 48.39, 25),
]


def main():
  errors = []
  print(f"{'run':108s} {'model GB':>9s} {'measured':>9s} {'error':>7s}")
  for config, overrides, (data, fsdp, stage, tensor), measured, round_ in MEASURED:
    mesh = {"data": data, "fsdp": fsdp, "stage": stage, "tensor": tensor}
    cfg = load_config(config, {**overrides, **{f"mesh.{k}": v for k, v in mesh.items()}})
    hw = default_hardware("gpu", data * fsdp * stage * tensor)
    gb = estimate(planning_config(cfg, hw), mesh, hw).memory / 1e9
    errors.append(gb / measured - 1)
    label = f"{os.path.basename(config)} {' '.join(f'{k}={v}' for k, v in {**overrides, **mesh}.items() if v != 1)}"
    print(f"{label:108s} {gb:9.2f} {measured:9.2f} {100 * errors[-1]:+6.1f}%  (round {round_})")
  print(f"mean absolute error {100 * sum(map(abs, errors)) / len(errors):.1f}%")


if __name__ == "__main__":
  main()
