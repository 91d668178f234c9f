"""The config's schema: one dataclass per section (each field's docstring is its documentation,
which `describe_keys` and `paxlite keys` print), the default rules table and ConfigError."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

DTYPES = ("float32", "bfloat16", "float16")
FP8_MODES = ("none", "current", "delayed")
MESH_AXES = ("data", "fsdp", "stage", "tensor")
DCN_AXES = ("data", "fsdp", "stage")  # mesh axes that may also span slices / hosts (mesh.dcn_<axis>)


class ConfigError(ValueError):
  """A user-facing configuration mistake; the CLI prints it as one line and exits 2."""

  def __init__(self, message: str):
    # One line, whatever a key or value held: a newline in a YAML key must not split it.
    super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def _show(value: Any, limit: int = 80) -> str:
  """repr() for error messages: bounded length (and safe for ints too long to print)."""
  try:
    text = repr(value)
  except ValueError:  # int past sys.get_int_max_str_digits()
    text = f"<{type(value).__name__}>"
  return text if len(text) <= limit else text[: limit - 3] + "..."


# The default rules table: (logical axis name, mesh axes). Order matters: for each array
# dimension the first rule whose mesh axes are still free in that array wins, so a name may
# be listed twice with a fallback (T5X / MaxText semantics). `None` means replicated.
#
# Parameters: 'embed' is sharded over fsdp (ZeRO-3: every weight matrix has an embed
# dimension, so parameters and optimiser state are split fsdp ways); heads, kv_heads and mlp
# over tensor (Megatron column-then-row parallel); vocab over tensor for the embedding and
# output head. Activations: batch over (data, fsdp); activation 'act_embed' stays replicated
# so that each tensor-parallel block half ends in a single all-reduce.
DEFAULT_RULES: list[list[Any]] = [
    ["batch", ["data", "fsdp"]],
    ["length", None],
    ["act_embed", None],
    ["act_heads", "tensor"],
    ["act_kv_heads", "tensor"],
    ["act_mlp", "tensor"],
    ["act_vocab", "tensor"],
    ["vocab", "tensor"],
    ["embed", "fsdp"],
    ["embed", None],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["head_dim", None],
    ["mlp", "tensor"],
    ["norm", None],
    ["layers", "stage"],
]


# Hashable (by value; never mutated after loading) because the model keeps it, and jit
# takes a model's NNX graph definition as a static, hashed argument (paxlite.sample).
@dataclass(unsafe_hash=True)
class ModelConfig:
  num_layers: int = 2
  """Number of decoder blocks."""
  d_model: int = 64
  """Width of the residual stream."""
  num_heads: int = 4
  """Query heads per attention layer."""
  num_kv_heads: int | None = None
  """Key/value heads (grouped-query attention); must divide num_heads. Null means num_heads."""
  head_dim: int | None = None
  """Width of one head. Null means d_model // num_heads."""
  d_ff: int = 256
  """Hidden width of the SwiGLU MLP."""
  vocab_size: int = 256
  """Embedding rows: at least the tokenizer's vocabulary; divisible by the mesh axes `vocab` maps to."""
  seq_len: int = 128
  """Training sequence length in tokens."""
  max_seq_len: int | None = None
  """Longest sequence the model accepts (training and sampling). Null means seq_len."""
  rope_theta: float = 10000.0
  """Rotary position embedding base."""
  norm_eps: float = 1e-5
  """RMSNorm epsilon."""
  tie_embeddings: bool = False
  """Reuse the token embedding as the output head."""
  init_std: float = 0.02
  """Standard deviation of the normal initialiser for embeddings and projections."""
  scan_layers: bool = True
  """Run the stacked decoder layers with a scan (compile time independent of depth)."""
  remat: str = "none"
  """Rematerialisation of each decoder block: none (keep all activations) | full (recompute
  the block) | dots_saveable (keep matmul outputs) | dots_attention_saveable (also keep the
  fused attention's forward) | operands_saveable (also keep the matmuls' and attention's
  inputs, fp8-quantised ones under fp8) | offload (recompute the block, its input kept in
  host memory)."""
  attention: str = "auto"
  """Attention: auto (cudnn on GPU for 16-bit compute, else xla) | xla | cudnn (both through
  jax.nn.dot_product_attention) | blockwise (plain-JAX flash attention: cudnn's memory on any backend)."""
  norm_kernel: str = "auto"
  """RMSNorms with the residual adds before them: auto (pallas on GPU, else xla) | xla (XLA's
  fusions: two or three passes over the activations per norm) | pallas (fused Pallas kernels,
  one pass each way; GPU only; where the shapes do not fit them, and under pipelines, xla)."""


@dataclass
class MeshConfig:
  data: int = -1
  """Data-parallel axis size (per slice or host when a mesh.dcn_* axis is > 1). -1 (at most one
  axis) takes the remaining devices."""
  fsdp: int = 1
  """Fully-sharded data-parallel axis size (parameters and optimiser state split)."""
  stage: int = 1
  """Pipeline stages: the stacked layers split over this axis (rule `layers -> stage`)."""
  tensor: int = 1
  """Tensor-parallel axis size (heads and MLP split)."""
  dcn_data: int = 1
  """Slices or hosts the data axis spans: the mesh's data axis is data x dcn_data, with the
  dcn_data groups across the slow network (DCN, InfiniBand) and `data` inside a slice or host."""
  dcn_fsdp: int = 1
  """Slices or hosts the fsdp axis spans (fsdp x dcn_fsdp in all); parameter gathers cross the slow network."""
  dcn_stage: int = 1
  """Slices or hosts the pipeline spans (stage x dcn_stage stages in all); only activations cross between them."""

  @property
  def stages(self) -> int:
    """Pipeline stages in all: stage x dcn_stage."""
    return self.stage * self.dcn_stage


@dataclass
class DistributedConfig:
  coordinator: str | None = None
  """host:port of process 0's coordination service for multi-process runs. Null: $JAX_COORDINATOR_ADDRESS,
  else what a detected cluster launcher (SLURM, Open MPI, Cloud TPU, GKE) says, else one process."""
  num_processes: int | None = None
  """Processes in the run. Null: $JAX_NUM_PROCESSES, else the launcher's count."""
  process_id: int | None = None
  """This process's index, 0 .. num_processes-1. Null: $JAX_PROCESS_ID, else the launcher's rank."""
  timeout_s: int = 300
  """Seconds to wait for every process to join before failing."""


@dataclass
class PipelineConfig:
  microbatches: int = 1
  """Micro-batches per pipelined step (M); must divide train.batch_size / train.grad_accum."""
  schedule: str = "gpipe"
  """gpipe (bubble (P-1)/(M+P-1)) | circular (interleaved; bubble (P-1)/(R M+P-1), needs M >= P)."""
  repeats: int = 1
  """Virtual stages per device for the circular schedule (R); layers must divide by stage x repeats."""


@dataclass
class PrecisionConfig:
  params: str = "float32"
  """Storage dtype of parameters and optimiser state."""
  compute: str = "bfloat16"
  """Dtype of activations and matrix multiplies; norms, softmax and the loss stay float32."""
  fp8: str = "none"
  """fp8 matmuls in the decoder blocks (attention q/k/v/o, MLP gate/up/down; the embedding,
  the head unless precision.fp8_head, norms, softmax and loss stay in compute dtype or
  float32): none | current (each tensor scaled by its own amax this step) | delayed (scaled
  by the max of an amax history). e4m3 forward, e5m2 gradients. Needs compute bfloat16 or
  float32."""
  fp8_history: int = 1024
  """Amax history length per fp8 tensor for fp8: delayed (kept in the train state and checkpoints)."""
  fp8_head: bool = False
  """Also run the output head's matmul in fp8 (with precision.fp8's scaling; its logits
  gradient in e5m2). Off by default: the logits are what the loss reads, and fp8 recipes
  usually leave the head in higher precision. Needs precision.fp8 current or delayed and an
  untied head."""
  compute_copy: bool = True
  """With unrolled layers (model.scan_layers=false), compute narrower than params, paxlite's own
  model and no pipeline: between steps, keep each decoder-block parameter and its optimizer
  moments as one array per layer, and the blocks' kernels also in compute dtype, written by
  the optimizer in the same pass as the params. The next step's matmuls read those copies
  instead of a pass that casts and splits the stacked kernels (~0.5% of the 1.7B bench
  step). The same arithmetic either way (across devices XLA may order a sum differently);
  2 bytes per block parameter more held between steps. Checkpoints and Trainer.state keep
  the stacked layout."""
  loss_scale: str = "auto"
  """Dynamic loss scaling: auto (on when compute is float16) | dynamic | none."""
  loss_scale_init: float = 32768.0
  """Initial loss scale; halved (and the step skipped) when gradients are not finite."""
  loss_scale_period: int = 2000
  """Consecutive finite steps after which the loss scale doubles."""


@dataclass
class TrainConfig:
  steps: int = 100
  """Optimizer steps to run."""
  batch_size: int = 8
  """Global batch size in sequences per optimizer step (all micro-batches together)."""
  grad_accum: int = 1
  """Micro-batches accumulated inside one compiled step; must divide batch_size."""
  lr: float = 3e-4
  """Peak learning rate."""
  warmup_steps: int = 10
  """Linear warm-up steps, then cosine decay to lr * min_lr_ratio at the last step."""
  min_lr_ratio: float = 0.1
  """Final learning rate as a fraction of lr."""
  weight_decay: float = 0.1
  """AdamW decoupled weight decay; never applied to norm scales."""
  decay_embeddings: bool = False
  """Whether weight decay also applies to the token embedding."""
  b1: float = 0.9
  """AdamW beta1."""
  b2: float = 0.95
  """AdamW beta2."""
  eps: float = 1e-8
  """AdamW epsilon."""
  grad_clip: float = 1.0
  """Global gradient-norm clipping threshold; 0 disables it."""
  z_loss: float = 0.0
  """Weight of the z-loss (log-partition squared) added to the cross-entropy."""
  loss_kernel: str = "auto"
  """The loss's pass over the logits (logsumexp and the targets' logits): auto (pallas on GPU,
  else xla) | xla (XLA's fusions: a max, then a sum, over the logits) | pallas (one Pallas
  kernel reading them once; GPU only; where the vocabulary is split over devices, xla)."""
  log_every: int = 10
  """Steps between metric lines."""
  on_nan: str = "skip"
  """A step whose loss or gradient norm is not finite never updates the weights; then: skip (count it
  in nan_steps and go on) | rollback (reload the last checkpoint and leave the offending batch out)
  | stop (save a checkpoint and the batch, exit 3)."""
  nan_limit: int = 20
  """Stop (as with on_nan=stop) at this many non-finite steps in a row (skip) or since the last
  new checkpoint (rollback): the run has diverged. 0: no limit."""


@dataclass
class DataConfig:
  source: str = "stdlib"
  """stdlib (the Python standard library's .py files) | synthetic (random tokens) | a path to
  a text file, a .jsonl file or a directory of such files."""
  tokenizer: str = "byte"
  """byte (256 byte-level tokens) | a path to a `tokenizers` tokenizer.json."""
  text_field: str = "text"
  """Field holding the text in JSONL records."""
  val_fraction: float = 0.02
  """Fraction of the token stream held out for validation."""
  cache_dir: str | None = None
  """Where tokenized corpora are cached (memory-mapped). Null: $PAXLITE_CACHE or ~/.cache/paxlite."""
  max_files: int | None = None
  """Read at most this many files of a directory source (sorted order). Null: all."""


@dataclass
class EvalConfig:
  every: int = 100
  """Steps between validation-loss evaluations (0 disables)."""
  batches: int = 4
  """Validation batches (of train.batch_size sequences) per evaluation."""


@dataclass
class CheckpointConfig:
  every: int = 100
  """Steps between checkpoints (0 disables; the last step is always saved)."""
  keep: int = 3
  """Most recent checkpoints kept."""
  async_save: bool = True
  """Write checkpoints in the background while training continues."""
  verify: bool = True
  """Record a sha256 of every checkpoint file when it is written and check them before restoring
  (false: check only that every file is there with its size, for very large checkpoints)."""


@dataclass
class RunConfig:
  dir: str = "runs/default"
  """Run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints/."""
  seed: int = 0
  """Seed for parameter init and data order."""
  peak_flops: float | None = None
  """Peak dense bf16 FLOP/s of one device for MFU. Null: known GPUs are detected (H100/H200:
  989e12); unknown devices and CPUs report no MFU."""
  tensorboard: bool = True
  """Write TensorBoard event files."""
  progress: str = "auto"
  """Progress display: auto (a bar on a terminal or in a notebook, plain lines otherwise) | bar | lines |
  none (no bar and no per-step lines, e.g. for sweeps from Python; one-off messages such as the
  compile banner, rollbacks and signals still print, and metrics still go to the run directory)."""
  compile_cache: str = "auto"
  """Persistent cache of compiled steps, so a restarted or repeated run of the same shapes
  loads its step instead of compiling it (an fp8 step compiles for minutes): auto (a directory
  already set for jax, e.g. $JAX_COMPILATION_CACHE_DIR, else $PAXLITE_CACHE/jax or
  ~/.cache/paxlite/jax) | none (paxlite sets none up) | a directory."""


@dataclass
class Config:
  model: ModelConfig = field(default_factory=ModelConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  distributed: DistributedConfig = field(default_factory=DistributedConfig)
  rules: list[list[Any]] = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])
  pipeline: PipelineConfig = field(default_factory=PipelineConfig)
  precision: PrecisionConfig = field(default_factory=PrecisionConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  data: DataConfig = field(default_factory=DataConfig)
  eval: EvalConfig = field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  run: RunConfig = field(default_factory=RunConfig)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_yaml(self) -> str:
    return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Documentation of every key, read from the docstrings under the dataclass fields.
def describe_keys() -> list[tuple[str, str, str]]:
  """(dotted key, default, description) for every config key, in declaration order."""
  import ast
  import inspect

  rows = []
  for section in dataclasses.fields(Config):
    cls = typing.get_type_hints(Config)[section.name]
    if not dataclasses.is_dataclass(cls):
      rows.append((section.name, "see below", "ordered partition rules: [[logical_name, mesh_axes], ...]"))
      continue
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None]):
      if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
        docs[node.target.id] = " ".join(str(nxt.value.value).split())
    defaults = cls()
    for f in dataclasses.fields(cls):
      value = getattr(defaults, f.name)
      rows.append((f"{section.name}.{f.name}", "null" if value is None else str(value), docs.get(f.name, "")))
  return rows
