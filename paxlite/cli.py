"""The `paxlite` command: `paxlite train|shardings|bench|plan CONFIG [key=value ...]`, `paxlite keys`.

Every user mistake (a bad key, type, size, path or mesh) ends as one line on stderr naming
the key or file, and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from paxlite.config import ConfigError, load_config


class _Parser(argparse.ArgumentParser):

  def error(self, message: str) -> None:  # argparse's own usage errors: exit 2, one line
    self.print_usage(sys.stderr)
    print(f"paxlite: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="paxlite", description="Train language models on JAX with logical-axis sharding.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  train = sub.add_parser("train", help="train (or resume) the run a YAML config describes")
  train.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
  train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100 mesh.data=2")
  shardings = sub.add_parser("shardings", help="print where every parameter and activation lives on the mesh")
  shardings.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
  shardings.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.fsdp=8")
  shardings.add_argument("--devices", type=int, default=None, metavar="N",
                         help="device count to lay the mesh over (default: the product of the mesh axes, or "
                              "the devices present when an axis is -1); no devices are needed")
  bench = sub.add_parser("bench", help="time the compiled train step: tokens/s, TFLOP/s, MFU, memory")
  bench.add_argument("config", help="YAML config, e.g. configs/bench-1.7b.yaml")
  bench.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every run")
  bench.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
  bench.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation (default 3)")
  bench.add_argument("--runs", nargs="+", metavar="OVERRIDES", default=None,
                     help='several runs, each a quoted override list, e.g. "model.remat=none" "mesh.fsdp=2"; '
                          "each runs in its own process")
  bench.add_argument("--json", action="store_true", help="print only the JSON result line(s)")
  bench.add_argument("--out", help="also append the JSON result lines to this file")
  plan = sub.add_parser("plan", help="compile the train step for N devices without them: memory, FLOPs, "
                                      "collectives, FITS or DOES NOT FIT; --search ranks every layout")
  plan.add_argument("config", help="YAML config, e.g. configs/bench-1.7b.yaml")
  plan.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.fsdp=8")
  plan.add_argument("--devices", type=int, required=True, metavar="N", help="devices of the run to plan")
  plan.add_argument("--platform", default="gpu", help="gpu (H200 defaults) | tpu (v5p) | cpu (default gpu)")
  plan.add_argument("--device-memory", metavar="SIZE", help="memory of one device, e.g. 141GB or 80GiB")
  plan.add_argument("--memory-fraction", type=float, metavar="F",
                    help="share of device memory the run may use (gpu default: $XLA_PYTHON_CLIENT_MEM_FRACTION or 0.75)")
  plan.add_argument("--peak-flops", type=float, metavar="F", help="dense bf16 FLOP/s of one device")
  plan.add_argument("--ici-bandwidth", metavar="SIZE", help="bytes/s per device along an axis inside a slice/host")
  plan.add_argument("--dcn-bandwidth", metavar="SIZE", help="bytes/s per device along an axis across slices/hosts")
  plan.add_argument("--efficiency", type=float, metavar="F", help="fraction of peak FLOP/s reached (default 0.55)")
  plan.add_argument("--ici-domain", type=int, metavar="N",
                    help="devices sharing the fast interconnect (gpu default 8: one NVLink host; 0: all devices)")
  plan.add_argument("--search", action="store_true", help="rank every mesh factorisation x remat policy")
  plan.add_argument("--top", type=int, default=3, metavar="K", help="with --search: compile the K fastest that fit (default 3)")
  plan.add_argument("--json", action="store_true", help="print one JSON line instead of the report")
  keys = sub.add_parser("keys", help="list every config key with its default and meaning")
  keys.add_argument("--markdown", action="store_true", help="print a Markdown table")
  return parser


def _bench(args: argparse.Namespace) -> int:
  import json

  from paxlite import bench

  if args.steps < 1 or args.warmup < 0:
    raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
  cfg = load_config(args.config, args.overrides)  # checks the base config before any run starts
  if args.runs:
    for run in args.runs:
      load_config(args.config, list(args.overrides) + run.split())
    results = bench.run_in_subprocesses(args.config, args.overrides, args.runs, steps=args.steps, warmup=args.warmup)
  else:
    results = [{"run": " ".join(args.overrides), **bench.run_benchmark(cfg, steps=args.steps, warmup=args.warmup)}]
  lines = [json.dumps(r) for r in results]
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  if not args.json:
    print(bench.format_table(results))
  return 1 if any("error" in r for r in results) else 0


def _keys(args: argparse.Namespace) -> int:
  from paxlite.config import describe_keys

  rows = describe_keys()
  if args.markdown:
    print("| key | default | meaning |\n| --- | --- | --- |")
    for key, default, doc in rows:
      escaped = doc.replace("|", "\\|")
      print(f"| `{key}` | `{default}` | {escaped} |")
  else:
    width = max(len(k) for k, _, _ in rows)
    for key, default, doc in rows:
      print(f"{key:<{width}}  {default:<14}  {doc}")
  return 0


def _train(args: argparse.Namespace) -> int:
  cfg = load_config(args.config, args.overrides)
  from paxlite.mesh import initialize_distributed  # imports jax: after the config is known to be good

  initialize_distributed(cfg.distributed)  # before anything touches a device
  from paxlite.trainer import Trainer

  trainer = Trainer(cfg)
  history = trainer.train()
  if history and trainer.is_writer:
    last = history[-1]
    summary = f"paxlite: done, step {last['step']}, loss {last['loss']:.4f}"
    if "eval_loss" in last:
      summary += f", eval_loss {last['eval_loss']:.4f}"
    print(f"{summary}; run directory {cfg.run.dir}", file=sys.stderr)
  return 0


def _shardings(args: argparse.Namespace) -> int:
  cfg = load_config(args.config, args.overrides)
  if args.devices is not None and args.devices < 1:
    raise ConfigError(f"--devices: expected a positive number of devices, got {args.devices}")
  from paxlite.shardings import explain_sharding  # imports jax: after the config is known to be good

  print(explain_sharding(cfg, num_devices=args.devices))
  return 0


def _plan(args: argparse.Namespace) -> int:
  import dataclasses
  import json
  import os

  cfg = load_config(args.config, args.overrides)
  if args.devices < 1 or args.top < 1:
    raise ConfigError(f"--devices and --top: expected positive numbers, got {args.devices} and {args.top}")
  if "jax" not in sys.modules:  # compile on N simulated CPU devices: set up before jax is imported
    from paxlite.plan import device_flags

    os.environ.update(device_flags(args.devices))
  from paxlite import costmodel, plan

  hw = costmodel.default_hardware(args.platform, args.devices)
  given = {"memory": args.device_memory and plan.parse_size(args.device_memory, "--device-memory"),
           "memory_fraction": args.memory_fraction, "peak_flops": args.peak_flops, "efficiency": args.efficiency,
           "ici_bandwidth": args.ici_bandwidth and plan.parse_size(args.ici_bandwidth, "--ici-bandwidth"),
           "dcn_bandwidth": args.dcn_bandwidth and plan.parse_size(args.dcn_bandwidth, "--dcn-bandwidth")}
  for key, value in given.items():
    if value is not None and not (value > 0 and (key not in ("memory_fraction", "efficiency") or value <= 1)):
      raise ConfigError(f"--{key.replace('_', '-')}: expected a positive number (at most 1 for fractions), got {value}")
  hw = dataclasses.replace(hw, **{k: v for k, v in given.items() if v is not None})
  if args.ici_domain is not None:
    if args.ici_domain < 0:
      raise ConfigError(f"--ici-domain: expected a number of devices (0: all), got {args.ici_domain}")
    hw = dataclasses.replace(hw, ici_domain=args.ici_domain or None)
  plans = plan.run(cfg, args.devices, hw, search_layouts=args.search, top=args.top)
  if args.json:
    print(json.dumps({"plans": [p.to_dict() for p in plans]}))
  elif args.search:
    print(plan.format_search(plans, cfg))
  else:
    print(plan.format_plan(plans[0], cfg))
  return 0 if plans and plans[0].fits else 1


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "train":
      return _train(args)
    if args.command == "shardings":
      return _shardings(args)
    if args.command == "bench":
      return _bench(args)
    if args.command == "plan":
      return _plan(args)
    if args.command == "keys":
      return _keys(args)
  except ConfigError as e:
    print(f"paxlite: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("paxlite: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
