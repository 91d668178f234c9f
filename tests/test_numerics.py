"""fp8 quantisation, scaling and amax histories; loss scaling; the HLO GEMM counter; config keys."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlite import numerics as nx
from paxlite.config import ConfigError, load_config

E4M3, E5M2 = nx.FORWARD_FP8, nx.BACKWARD_FP8


def spread(seed, shape, decades=4):
  """Values whose magnitudes span `decades` powers of ten, both signs."""
  rng = np.random.default_rng(seed)
  mag = 10.0 ** rng.uniform(-decades, 0, shape) * 3.7
  return jnp.asarray(mag * rng.choice([-1.0, 1.0], shape), jnp.float32)


@pytest.mark.parametrize("dtype,mantissa_bits,min_normal_exp,subnormal_exp", [
    (E4M3, 3, -6, -9), (E5M2, 2, -14, -16)])
def test_quantize_dequantize_round_trip(dtype, mantissa_bits, min_normal_exp, subnormal_exp):
  x = spread(0, (4096,))
  scale = nx.scale_for(nx.amax(x), dtype)
  # A power of two, and the tightest one: amax lands in the top binade of the fp8 range.
  assert np.frexp(float(scale))[0] == 0.5
  assert nx.fp8_max(dtype) / 2 < float(nx.amax(x) / scale) <= nx.fp8_max(dtype)
  q = nx.quantize(x, scale, dtype)
  assert q.dtype == dtype
  back = nx.dequantize(q, scale, jnp.float32)
  err = np.abs(np.asarray(back - x))
  scaled = np.abs(np.asarray(x / scale))
  normal = scaled >= 2.0 ** min_normal_exp
  # Round to nearest: half an ulp, relative for normals, absolute (in scaled units) below.
  assert np.all(err[normal] <= np.abs(np.asarray(x))[normal] * 2.0 ** -(mantissa_bits + 1))
  assert np.all(err[~normal] <= float(scale) * 2.0 ** (subnormal_exp - 1))
  assert normal.mean() > 0.5 and err.max() > 0  # the test exercises both ranges, and rounding happens


def test_scale_for_edge_cases():
  s = lambda a: float(nx.scale_for(jnp.float32(a), E4M3))
  assert s(448.0) == 1.0 and s(449.0) == 2.0 and s(224.0) == 0.5
  assert s(1.0) == 2.0 ** -8  # 1 / 2^-8 = 256 <= 448 < 512
  assert s(0.0) == s(np.inf) == s(np.nan) == 1.0  # nothing seen yet, or an overflow: no rescale


def test_quantize_saturates_instead_of_nan():
  # A delayed scale that is too small for this step's tensor: e4m3fn has no inf, would give NaN.
  q = nx.quantize(jnp.array([1e6, -1e6, 3.0]), jnp.float32(1.0), E4M3)
  np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), [448.0, -448.0, 3.0])


def test_amax_history_push_and_max():
  h = jnp.array([[1.0, 8.0, 2.0], [4.0, 4.0, 4.0], [0.5, 0.25, 64.0]])
  new = nx.push_amax(h, jnp.array([3.0, 1.0, 2.0]))
  np.testing.assert_array_equal(np.asarray(new), [[3, 1, 8], [1, 4, 4], [2, 0.5, 0.25]])
  # Scales come from the max over the whole history, not its newest entry.
  s_x, s_w, s_g = nx.history_scales(new)
  assert float(s_x) == float(nx.scale_for(jnp.float32(8.0), E4M3))
  assert float(s_w) == float(nx.scale_for(jnp.float32(4.0), E4M3))
  assert float(s_g) == float(nx.scale_for(jnp.float32(2.0), E5M2))


def test_seen_one_hots_sum_to_the_max_scale():
  uses = [jnp.array([3.0, 0.02, 1e-3]), jnp.array([700.0, 0.01, 0.0]), jnp.array([5.0, 0.03, 2e-5])]
  seen = sum(nx.scale_one_hot(a) for a in uses)
  assert float(seen.sum()) == 8  # one per tensor and use, nothing for the zero gradient amax
  got = nx.seen_amax(seen)
  # The decoded amax is the top of the largest needed scale's range: it gives back that scale.
  for row, dtype in enumerate(nx.ROW_DTYPES):
    largest = max(float(a[row]) for a in uses)
    assert float(nx.scale_for(got[row], dtype)) == float(nx.scale_for(jnp.float32(largest), dtype))
    assert largest <= float(got[row]) < 2 * largest
  np.testing.assert_array_equal(np.asarray(nx.seen_amax(jnp.zeros((3, nx.SCALE_BINS)))), [0, 0, 0])
  # Stacked layers and pairing with the histories by path.
  hist = {"q": {"fp8_history": jnp.zeros((2, 3, 4))}}
  seen2 = {"q": {"fp8_seen": jnp.stack([seen, jnp.zeros_like(seen)])}}
  new = nx.update_histories(hist, seen2)["q"]["fp8_history"]
  np.testing.assert_array_equal(np.asarray(new[0, :, 0]), np.asarray(got))
  assert float(jnp.abs(new[1]).max()) == 0.0 and float(jnp.abs(new[:, :, 1:]).max()) == 0.0


EQ = "btd,dnh->btnh"


@pytest.fixture(scope="module")
def operands():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (4, 8, 32))
  w = jax.random.normal(k2, (32, 4, 16)) * 0.05
  g = jax.random.normal(k3, (4, 8, 4, 16))
  return x, w, g


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def unseen():
  return jnp.zeros((3, nx.SCALE_BINS))


def test_fp8_einsum_close_to_float32_and_current_equals_primed_delayed(operands):
  x, w, g = operands
  exact = jnp.einsum(EQ, x, w)
  dx, dw = jax.grad(lambda x, w: jnp.sum(jnp.einsum(EQ, x, w) * g), (0, 1))(x, w)
  cur = lambda x, w: jnp.sum(nx.fp8_einsum(EQ, x, w) * g)
  delayed = lambda x, w, h, seen: jnp.sum(nx.fp8_einsum(EQ, x, w, h, seen) * g)
  cur_dx, cur_dw = jax.grad(cur, (0, 1))(x, w)
  assert rel(nx.fp8_einsum(EQ, x, w), exact) < 0.05
  assert rel(cur_dx, dx) < 0.1 and rel(cur_dw, dw) < 0.1  # e5m2 gradients: 2 mantissa bits

  # Delayed scaling from an empty history: the seen port's gradient records this use's scales.
  empty = jnp.zeros((3, 5))
  _, _, d_hist, seen = jax.grad(delayed, (0, 1, 2, 3))(x, w, empty, unseen())
  assert float(jnp.abs(d_hist).max()) == 0.0
  new = nx.update_histories({"h": empty}, {"h": seen})["h"]
  for row, a in enumerate([nx.amax(x), nx.amax(w), nx.amax(g)]):
    assert float(nx.scale_for(new[row, 0], nx.ROW_DTYPES[row])) == float(nx.scale_for(a, nx.ROW_DTYPES[row]))
  assert float(jnp.abs(new[:, 1:]).max()) == 0.0
  # With that history, delayed scaling uses the very scales current scaling computes.
  del_dx, del_dw, _, _ = jax.grad(delayed, (0, 1, 2, 3))(x, w, new, unseen())
  np.testing.assert_array_equal(np.asarray(nx.fp8_einsum(EQ, x, w, new, unseen())),
                                np.asarray(nx.fp8_einsum(EQ, x, w)))
  np.testing.assert_array_equal(np.asarray(del_dx), np.asarray(cur_dx))
  np.testing.assert_array_equal(np.asarray(del_dw), np.asarray(cur_dw))


def test_fp8_einsum_in_bfloat16_keeps_dtypes(operands):
  x, w, g = (a.astype(jnp.bfloat16) for a in operands)
  y = nx.fp8_einsum(EQ, x, w, jnp.zeros((3, 4)), unseen())
  assert y.dtype == jnp.bfloat16
  loss = lambda x, w, s: jnp.sum(nx.fp8_einsum(EQ, x, w, jnp.zeros((3, 4)), s).astype(jnp.float32) * g)
  dx, dw, seen = jax.grad(loss, (0, 1, 2))(x, w, unseen())
  assert (dx.dtype, dw.dtype, seen.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  exact_dx = jax.grad(lambda x: jnp.sum(jnp.einsum(EQ, x, w).astype(jnp.float32) * g))(x)
  assert rel(dx.astype(jnp.float32), exact_dx.astype(jnp.float32)) < 0.1


def test_a_layer_used_many_times_records_the_max_not_sum_or_last(operands):
  """One layer applied to several micro-batches inside one differentiated function (a
  pipeline stage, a closure in a scan): its history gets the largest amax of any use."""
  x, w, g = operands
  xs = jnp.stack([x, 5.0 * x, 0.5 * x])  # the middle micro-batch has the largest input amax
  gs = jnp.stack([g, 0.1 * g, 3.0 * g])  # and the last the largest gradient

  def loss(seen):
    def body(total, xg):
      xi, gi = xg
      return total + jnp.sum(nx.fp8_einsum(EQ, xi, w, jnp.zeros((3, 4)), seen) * gi), None

    return jax.lax.scan(body, 0.0, (xs, gs))[0]

  seen = jax.jit(jax.grad(loss))(unseen())
  new = nx.seen_amax(seen)
  expected = [5 * nx.amax(x), nx.amax(w), 3 * nx.amax(g)]
  for row, a in enumerate(expected):
    assert float(nx.scale_for(new[row], nx.ROW_DTYPES[row])) == float(nx.scale_for(a, nx.ROW_DTYPES[row]))
  # The last use alone (or the first) would have needed smaller input / gradient scales.
  assert float(nx.scale_for(0.5 * nx.amax(x), E4M3)) < float(nx.scale_for(new[0], E4M3))
  assert float(nx.scale_for(nx.amax(g), E5M2)) < float(nx.scale_for(new[2], E5M2))


def test_an_unused_output_records_nothing(operands):
  x, w, _ = operands
  seen = jax.grad(lambda s: 0.0 * jnp.sum(nx.fp8_einsum(EQ, x, w, jnp.zeros((3, 4)), s)))(unseen())
  assert float(jnp.abs(seen).max()) == 0.0


def test_split_equation_checks_projections():
  assert nx.split_equation("btnh,nhd->btd") == ("btnh", "nhd", "btd")
  assert nx.split_equation("bqd,bkd->bqk") == ("bqd", "bkd", "bqk")  # batch letter in all three
  with pytest.raises(ValueError, match="summed within one operand"):
    nx.split_equation("btd,df->bf")
  with pytest.raises(ValueError, match="expected 'lhs,rhs->out'"):
    nx.split_equation("btd->bt")


def test_loss_scaler_grows_after_period_and_halves_on_overflow():
  scaler = nx.LossScaler(initial=8.0, period=3)
  state = scaler.init()
  trace = []
  for finite in [True, True, True, True, False, True, False, False]:
    state = scaler.update(state, jnp.asarray(finite))
    trace.append((float(state["scale"]), int(state["good_steps"]), int(state["skipped_steps"])))
  assert trace == [(8, 1, 0), (8, 2, 0), (16, 0, 0), (16, 1, 0), (8, 0, 1), (8, 1, 1), (4, 0, 2), (2, 0, 3)]


def test_loss_scaler_from_config():
  auto16 = load_config(None, {"precision.compute": "float16"}).precision
  assert nx.LossScaler.from_config(auto16) == nx.LossScaler(32768.0, 2000)
  assert nx.LossScaler.from_config(load_config(None, {}).precision) is None  # bfloat16: off
  forced = load_config(None, {"precision.loss_scale": "dynamic", "precision.loss_scale_init": 4}).precision
  assert nx.LossScaler.from_config(forced) == nx.LossScaler(4.0, 2000)
  off16 = load_config(None, {"precision.compute": "float16", "precision.loss_scale": "none"}).precision
  assert nx.LossScaler.from_config(off16) is None


# Lines in the form of XLA:GPU's optimised HLO (operand shapes printed): cuBLAS custom calls,
# a cuBLASLt fp8 call, a Triton GEMM fusion, and look-alikes that are not GEMMs.
HLO = r"""
%custom-call.1 = (bf16[1024,512]{1,0}, s8[4194304]{0}) custom-call(bf16[1024,256]{1,0} %p.1, bf16[256,512]{1,0} %p.2), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1}}
%custom-call.2 = (bf16[1024,256]{1,0}, s8[33554432]{0}) custom-call(f8e4m3fn[1024,256]{1,0} %q.1, f8e4m3fn[256,256]{0,1} %q.2, f32[] %s.1, f32[] %s.2), custom_call_target="__cublas$lt$matmul$f8", backend_config={}
%custom-call.3 = (bf16[1024,256]{1,0}, s8[33554432]{0}) custom-call(f8e5m2[1024,512]{1,0} %g.1, f8e4m3fn[256,512]{1,0} %q.3, f32[] %s.3, f32[] %s.4), custom_call_target="__cublas$lt$matmul$f8"
%custom-call.4 = (f32[64,64]{1,0}, s8[4194304]{0}) custom-call(f32[64,32]{1,0} %a, f32[32,64]{1,0} %b), custom_call_target="__cublas$lt$matmul", backend_config={}
%fusion.7 = bf16[1024,256]{1,0} fusion(bf16[1024,512]{1,0} %x, bf16[512,256]{1,0} %y), kind=kCustom, calls=%gemm_fusion_dot.7, backend_config={"fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":{"block_m":"64"}}}
%fusion.8 = bf16[1024,256]{1,0} fusion(bf16[1024,256]{1,0} %x), kind=kLoop, calls=%fused_convert
%custom-call.9 = (bf16[8,128,4,64]{3,2,1,0}, u8[0]{0}) custom-call(bf16[8,128,4,64]{3,2,1,0} %q, bf16[8,128,4,64]{3,2,1,0} %k), custom_call_target="__cudnn$fmhaSoftmax"
%gemm_fusion_dot.7 (p0: bf16[1024,512], p1: bf16[512,256]) -> bf16[1024,256] {
"""


def test_count_gemms_on_gpu_hlo_lines():
  assert nx.count_gemms(HLO) == {"fp8": 2, "bf16": 2, "f32": 1}
  assert nx.count_gemms("") == {}


@pytest.mark.parametrize("overrides,message", [
    ({"precision.fp8": "e4m3"}, "precision.fp8: expected one of none | current | delayed, got 'e4m3'"),
    ({"precision.fp8": "delayed", "precision.compute": "float16"},
     "precision.fp8: fp8 matmuls need precision.compute bfloat16 or float32, got float16"),
    ({"precision.fp8_history": 0}, "precision.fp8_history: expected a positive number, got 0"),
    ({"precision.loss_scale": "static"}, "precision.loss_scale: expected one of auto | dynamic | none"),
    ({"precision.loss_scale_init": -1.0}, "precision.loss_scale_init: expected a positive number"),
    ({"precision.loss_scale_period": 0}, "precision.loss_scale_period: expected a positive number"),
])
def test_precision_config_errors(overrides, message):
  with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
    load_config(None, overrides)


# Lines as XLA:GPU (jax 0.11, H200) really prints optimised HLO: operands by name only, the
# types on the defining instructions; a cuBLASLt call and a nested Triton GEMM fusion.
HLO_BY_NAME = r"""
  %bitcast.245.0 = bf16[16384,8192]{1,0} bitcast(%loop_multiply_fusion.2)
  %bitcast.244.0 = bf16[8192,2048]{1,0} bitcast(%param.3)
  %custom-call.9 = (bf16[16384,2048]{1,0}, s8[33554432]{0}) custom-call(%bitcast.245.0, %bitcast.244.0), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(_step_fn)/dot_general"}
  %q.1 = f8e4m3fn[16384,2048]{1,0} fusion(%x), kind=kLoop, calls=%fused_convert
  %custom-call.10 = (bf16[16384,2048]{1,0}, s8[33554432]{0}) custom-call(%q.1, %w.1, %s.1, %s.2), custom_call_target="__cublas$lt$matmul$f8"
  %bitcast.444.0 = bf16[2048,16384]{0,1} bitcast(%get-tuple-element.3)
  %gemm_fusion_dot.24 = bf16[2048,8192]{1,0} fusion(%bitcast.444.0, %bitcast.249.0), kind=kCustom, calls=%gemm_fusion_dot.24_computation, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %input_reduce_fusion = f32[2048]{0} fusion(%get-tuple-element.93), kind=kCustom, calls=%fused_reduce, backend_config={"fusion_backend_config":{"kind":"__triton"}}
"""


def test_count_gemms_resolves_operands_printed_by_name():
  assert nx.count_gemms(HLO_BY_NAME) == {"bf16": 2, "fp8": 1}
