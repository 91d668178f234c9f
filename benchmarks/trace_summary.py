"""Where a step's GPU time goes: reads a jax.profiler trace (the *.trace.json.gz that
`hlo_report.py --trace` writes) and prints, for each device, the kernel time per step by kind
(GEMM, attention, copies, collectives, other fusions), the busy and idle time, where the idle
time sits (gaps by size, the longest with the kernels either side) and the top kernels of the
first device.

  python benchmarks/trace_summary.py OUT/trace [--steps 3] [--top 25]

Kernel names are matched by prefix; the kinds are what the H200 profile of the 1.7B step
shows (cuBLAS "nvjet"/"sm90_xmma", Triton "gemm_fusion", cuDNN flash attention, NCCL).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import sys

KINDS = (
    ("gemm", ("nvjet", "sm90_xmma", "cutlass", "gemm_fusion", "ampere_", "sm80_")),
    ("attention", ("cudnn", "flash")),
    ("collective", ("nccl", "ncclDevKernel", "all-reduce", "all-gather", "reduce-scatter")),
    ("copy/memset", ("memcpy", "Memcpy", "Memset", "memset", "copy")),
)


def kind_of(kernel: str) -> str:
  for kind, prefixes in KINDS:
    if kernel.startswith(prefixes) or any(p in kernel for p in prefixes[:2]):
      return kind
  return "other fusions"


def load(trace_dir: str) -> list[dict]:
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not files:
    raise SystemExit(f"trace_summary: no *.trace.json.gz under {trace_dir}")
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and "/device:" in e["args"]["name"]}
  return [e for e in events if e.get("ph") == "X" and e["pid"] in devices]


def union_us(events: list[dict]) -> tuple[float, float, float]:
  """(busy, first start, last end): busy is the union of the kernels' intervals, since kernels
  on different streams overlap."""
  spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
  busy, end = 0.0, float("-inf")
  for start, stop in spans:
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  return busy, spans[0][0], max(stop for _, stop in spans)


GAP_BUCKETS_US = (2, 5, 20, 100, 1000, float("inf"))


def gaps_us(events: list[dict]) -> list[tuple[float, str, str]]:
  """Each stretch with no kernel running, as (length, kernel before, kernel after)."""
  spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events)
  gaps, end, last = [], spans[0][1], spans[0][2]
  for start, stop, name in spans[1:]:
    if start > end:
      gaps.append((start - end, last, name))
    if stop > end:
      end, last = stop, name
  return gaps


def print_gaps(events: list[dict], steps: int, longest: int) -> None:
  """Idle time by gap length: many short gaps are launch overhead between kernels (what CUDA
  graphs remove); a few long ones are the host (dispatch, a transfer) or a step's boundary."""
  gaps = gaps_us(events)
  print(f"  kernels per step {len(events) // steps}, gaps per step {len(gaps) // steps}; idle by gap length:")
  low = 0.0
  for high in GAP_BUCKETS_US:
    inside = [g for g, _, _ in gaps if low < g <= high]
    label = f"{low:g}-{high:g} us" if high != float("inf") else f"> {low:g} us"
    print(f"    {label:<14} {len(inside) / steps:8.1f} per step {sum(inside) / 1000 / steps:8.3f} ms")
    low = high
  for length, before, after in sorted(gaps, reverse=True)[:longest]:
    print(f"    {length / 1000:7.3f} ms after {before[:60]} before {after[:60]}")


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("trace_dir")
  parser.add_argument("--steps", type=int, default=3, help="steps the trace holds (default 3)")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--gaps", type=int, default=8, help="longest gaps to list per device")
  args = parser.parse_args()

  kernels = load(args.trace_dir)
  ms = lambda us: us / 1000 / args.steps  # noqa: E731
  by_device = collections.defaultdict(list)
  for e in kernels:
    by_device[e["pid"]].append(e)
  # Per device: a collective running beside compute costs nothing unless compute waits for
  # it; "compute busy" is the union of the non-collective kernels, "idle" what no kernel uses.
  for pid, events in sorted(by_device.items()):
    busy, first, last = union_us(events)
    compute = [e for e in events if kind_of(e["name"]) != "collective"]
    compute_busy = union_us(compute)[0] if compute else 0.0
    print(f"device {pid}, per step: wall {ms(last - first):.1f} ms, busy {ms(busy):.1f} ms, "
          f"compute busy {ms(compute_busy):.1f} ms, idle {ms(last - first - busy):.1f} ms")
    by_kind = collections.Counter()
    for e in events:
      by_kind[kind_of(e["name"])] += e["dur"]
    for kind, us in by_kind.most_common():
      print(f"  {kind:<14} {ms(us):8.1f} ms")
    print_gaps(events, args.steps, args.gaps)

  per_kernel, calls = collections.Counter(), collections.Counter()
  first_device = by_device[min(by_device)]
  for e in first_device:
    per_kernel[e["name"]] += e["dur"]
    calls[e["name"]] += 1
  print(f"top {args.top} kernels of device {min(by_device)} (ms per step, calls per step):")
  for name, us in per_kernel.most_common(args.top):
    print(f"  {ms(us):8.2f} {calls[name] // args.steps:5d}  {name[:100]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
