"""The `paxlite` command: `paxlite train|shardings|bench|plan CONFIG [key=value ...]`, `paxlite keys`,
`paxlite plot RUN_DIR...`, and `sample`, `eval`, `export`, `import-hf` on run directories.

Every user mistake (a bad key, type, size, path or mesh) ends as one line on stderr naming
the key or file, and exit code 2; no traceback. A checkpoint that cannot be written ends as
one line and exit code 1, a run stopped on non-finite values (train.on_nan) as one line and 3.
"""

from __future__ import annotations

import argparse
import sys

from paxlite import xla_flags
from paxlite.config import ConfigError, load_config

# Exit statuses: 0 done (or stopped by SIGTERM with a checkpoint saved), 1 the environment
# failed (a checkpoint or file could not be written), 2 bad input, 3 non-finite loss or
# gradients (train.on_nan), 130 SIGINT (after saving a checkpoint).
EXIT_ENVIRONMENT, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_SIGINT = 1, 2, 3, 130


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
                    help="share of device memory the run may use (gpu: $XLA_PYTHON_CLIENT_MEM_FRACTION or 0.75)")
  plan.add_argument("--peak-flops", type=float, metavar="F", help="dense bf16 FLOP/s of one device")
  plan.add_argument("--ici-bandwidth", metavar="SIZE", help="bytes/s per device along an axis inside a slice/host")
  plan.add_argument("--dcn-bandwidth", metavar="SIZE", help="bytes/s per device along an axis across slices/hosts")
  plan.add_argument("--efficiency", type=float, metavar="F", help="fraction of peak FLOP/s reached (default 0.55)")
  plan.add_argument("--ici-domain", type=int, metavar="N",
                    help="devices sharing the fast interconnect (gpu default 8: one NVLink host; 0: all devices)")
  plan.add_argument("--search", action="store_true", help="rank every mesh factorisation x remat policy")
  plan.add_argument("--top", type=int, default=3, metavar="K",
                    help="with --search: compile the K fastest that fit (default 3)")
  plan.add_argument("--json", action="store_true", help="print one JSON line instead of the report")
  plot = sub.add_parser("plot", help="draw the loss and learning-rate curves of one or more runs")
  plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
  plot.add_argument("--out", default=None, help="image file to write (default RUN_DIR/loss.png of the first run)")
  keys = sub.add_parser("keys", help="list every config key with its default and meaning")
  keys.add_argument("--markdown", action="store_true", help="print a Markdown table")
  _add_generation_parsers(sub)
  return parser


def _add_generation_parsers(sub: argparse._SubParsersAction) -> None:
  """sample, eval, export, import-hf: commands on a trained run directory."""
  overrides = dict(nargs="*", help="dotted key=value overrides of the run's config, e.g. mesh.tensor=2")
  step = dict(type=int, help="checkpoint step to load (default: the latest)")
  sample = sub.add_parser("sample", help="continue prompts with a trained model (KV-cache decoding)")
  sample.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints/)")
  sample.add_argument("overrides", **overrides)
  sample.add_argument("--prompt", action="append", required=True, help="text to continue; repeat for a batch")
  sample.add_argument("--max-new-tokens", type=int,
                      help="tokens to generate per sample (default: up to model.max_seq_len)")
  sample.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default 0.8)")
  sample.add_argument("--top-k", type=int, default=40,
                      help="sample among the k most likely tokens; 0: all (default 40)")
  sample.add_argument("--top-p", type=float, default=0.95,
                      help="nucleus: the smallest set of tokens with this mass (default 0.95)")
  sample.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
  sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  sample.add_argument("--step", **step)
  evaluate = sub.add_parser("eval", help="validation loss and perplexity of a trained model")
  evaluate.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints/)")
  evaluate.add_argument("overrides", **overrides)
  evaluate.add_argument("--data", help="a text or .jsonl file or a directory to score instead of the run's split")
  evaluate.add_argument("--split", choices=("val", "train"), default="val",
                        help="split of the run's corpus (default val)")
  evaluate.add_argument("--batches", type=int, help="score at most this many batches (default: every sequence)")
  evaluate.add_argument("--batch-size", type=int, help="sequences per batch (default train.batch_size)")
  evaluate.add_argument("--step", **step)
  export = sub.add_parser("export", help="write a run's model as a Hugging Face Llama checkpoint")
  export.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints/)")
  export.add_argument("out_dir", help="new (or empty) directory for the checkpoint")
  export.add_argument("overrides", **overrides)
  export.add_argument("--format", choices=("hf",), default="hf", help="hf: transformers LlamaForCausalLM (default)")
  export.add_argument("--step", **step)
  imp = sub.add_parser("import-hf", help="start a run directory from a local Hugging Face Llama checkpoint")
  imp.add_argument("hf_dir", help="directory with config.json and model.safetensors (or its shards)")
  imp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. run.dir=runs/llama")
  imp.add_argument("--config", help="YAML config for training (model.* keys come from config.json)")


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


def _quiet_background_failures() -> None:
  """paxlite reports a failed checkpoint write in one line; Orbax would also log it with
  tracebacks from its threads (absl logging), asyncio would log each of the write's other
  failed futures ("exception was never retrieved"; only Orbax runs event loops here), and
  TensorStore's completions still arriving on Orbax's closed event loop would print more."""
  import logging

  for name in ("absl", "asyncio"):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  default = sys.unraisablehook

  def hook(unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
      return
    default(unraisable)

  sys.unraisablehook = hook


def _train(args: argparse.Namespace) -> int:
  cfg = load_config(args.config, args.overrides)
  from paxlite.mesh import initialize_distributed  # imports jax: after the config is known to be good

  initialize_distributed(cfg.distributed)  # before anything touches a device
  from paxlite.trainer import Trainer

  _quiet_background_failures()
  trainer = Trainer(cfg)
  history = trainer.train()
  if trainer.stopped_by is not None:  # the trainer said which checkpoint holds the run
    return EXIT_SIGINT if trainer.stopped_by == "SIGINT" else 0
  if history and trainer.is_writer:
    last = history[-1]
    summary = f"paxlite: done, step {last['step']}, loss {last['loss']:.4f}"
    if "eval_loss" in last:
      summary += f", eval_loss {last['eval_loss']:.4f}"
    print(f"{summary}; run directory {cfg.run.dir}", file=sys.stderr)
  return 0


def _sample(args: argparse.Namespace) -> int:
  if args.num_samples <= 0:
    raise ConfigError(f"--num-samples: expected a positive integer, got {args.num_samples}")
  from paxlite.data import load_tokenizer
  from paxlite.runs import load_run
  from paxlite.sample import sample_text

  model, cfg = load_run(args.run_dir, step=args.step, overrides=args.overrides)
  prompts = [p for p in args.prompt for _ in range(args.num_samples)]
  texts = sample_text(model, load_tokenizer(cfg.data.tokenizer), prompts, rules=cfg.rules,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed)
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    if len(prompts) > 1:
      print(f"{'' if i == 0 else chr(10)}==> sample {i + 1} <==")
    print(prompt + text, flush=True)
  return 0


def _eval(args: argparse.Namespace) -> int:
  import json

  from paxlite.evaluation import evaluate
  from paxlite.runs import load_run

  model, cfg = load_run(args.run_dir, step=args.step, overrides=args.overrides)
  result = evaluate(model, cfg, data=args.data, split=args.split, batches=args.batches, batch_size=args.batch_size)
  print(json.dumps(result))
  return 0


def _export(args: argparse.Namespace) -> int:
  from paxlite.export import export_hf
  from paxlite.runs import load_run

  model, cfg = load_run(args.run_dir, step=args.step, overrides=args.overrides)
  files = export_hf(model, cfg, args.out_dir)
  print(f"paxlite: wrote {', '.join(files)} to {args.out_dir}", file=sys.stderr)
  return 0


def _import_hf(args: argparse.Namespace) -> int:
  from paxlite.export import import_hf

  cfg = import_hf(args.hf_dir, args.config, args.overrides)
  print(f"paxlite: imported {args.hf_dir} into {cfg.run.dir}; train with: paxlite train "
        f"{cfg.run.dir}/config.yaml", file=sys.stderr)
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

  cfg = load_config(args.config, args.overrides)
  if args.devices < 1 or args.top < 1:
    raise ConfigError(f"--devices and --top: expected positive numbers, got {args.devices} and {args.top}")
  if "jax" not in sys.modules:  # compile on N simulated CPU devices: set up before jax is imported
    xla_flags.simulate_cpu_devices(args.devices)  # on a GPU machine too: plans never touch the GPUs
    xla_flags.apply_defaults(flags=xla_flags.COMPILE_ONLY)  # plans compile steps, never run them
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


def _plot(args: argparse.Namespace) -> int:
  from paxlite.plot import plot_runs

  out = args.out or f"{args.run_dirs[0].rstrip('/')}/loss.png"
  print(f"paxlite: wrote {plot_runs(args.run_dirs, out)}", file=sys.stderr)
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  # argparse fills a positional `overrides` list only before the first option; key=value
  # words after options (`paxlite sample RUN --prompt x mesh.tensor=2`) come back as extras.
  if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
    args.overrides += extra
  elif extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  xla_flags.apply_defaults()  # before any command initialises jax's backend
  try:
    if args.command == "train":
      return _train(args)
    if args.command == "shardings":
      return _shardings(args)
    if args.command == "bench":
      return _bench(args)
    if args.command == "plan":
      return _plan(args)
    if args.command == "plot":
      return _plot(args)
    if args.command == "keys":
      return _keys(args)
    if args.command == "sample":
      return _sample(args)
    if args.command == "eval":
      return _eval(args)
    if args.command == "export":
      return _export(args)
    if args.command == "import-hf":
      return _import_hf(args)
  except ConfigError as e:
    print(f"paxlite: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except Exception as e:  # noqa: BLE001 - only the known run-time failures are one line
    from paxlite import checkpoint, faults

    if isinstance(e, faults.NonFiniteError):
      print(f"paxlite: error: {e}", file=sys.stderr)
      return EXIT_NONFINITE
    if isinstance(e, (checkpoint.CheckpointError, OSError)):
      print(f"paxlite: error: {e}", file=sys.stderr)
      return EXIT_ENVIRONMENT
    raise
  except KeyboardInterrupt:
    print("paxlite: interrupted", file=sys.stderr)
    return EXIT_SIGINT
  return 0


if __name__ == "__main__":
  sys.exit(main())
