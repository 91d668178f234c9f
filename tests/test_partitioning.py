import pytest
from jax.sharding import PartitionSpec as P

from paxlite.config import DEFAULT_RULES, ConfigError
from paxlite.partitioning import format_rules, resolve

MESH = {"data": 2, "fsdp": 2, "stage": 1, "tensor": 2}


def test_default_rules_megatron_and_zero3_layout():
  assert resolve(("embed", "heads", "head_dim"), DEFAULT_RULES) == P("fsdp", "tensor", None)
  assert resolve(("heads", "head_dim", "embed"), DEFAULT_RULES) == P("tensor", None, "fsdp")
  assert resolve(("layers", "embed", "mlp"), DEFAULT_RULES) == P("stage", "fsdp", "tensor")
  assert resolve(("batch", "length", "act_embed"), DEFAULT_RULES) == P(("data", "fsdp"), None, None)
  assert resolve(("vocab", "embed"), DEFAULT_RULES) == P("tensor", "fsdp")


def test_repeated_name_falls_back_when_axis_taken():
  rules = [["a", "fsdp"], ["b", "fsdp"], ["b", "tensor"], ["b", None]]
  assert resolve(("a", "b"), rules) == P("fsdp", "tensor")
  assert resolve(("b",), rules) == P("fsdp")
  rules = [["a", ["fsdp", "tensor"]], ["b", "tensor"], ["b", None]]
  assert resolve(("a", "b"), rules) == P(("fsdp", "tensor"), None)


def test_first_matching_rule_wins_in_order():
  assert resolve(("x",), [["x", "data"], ["x", "tensor"]]) == P("data")


def test_missing_rule_names_array_and_axis():
  with pytest.raises(ConfigError, match=r"parameter 'w'.*no partition rule for logical axis 'bogus'"):
    resolve(("embed", "bogus"), DEFAULT_RULES, what="parameter 'w'")


def test_no_free_rule_is_an_error():
  with pytest.raises(ConfigError, match="already taken"):
    resolve(("a", "b"), [["a", "fsdp"], ["b", "fsdp"]], what="w")


def test_indivisible_dimension_names_size_and_axis():
  with pytest.raises(ConfigError, match=r"dimension 1 \('heads', size 3\).*tensor of size 2"):
    resolve(("embed", "heads"), DEFAULT_RULES, shape=(64, 3), mesh_shape=MESH, what="parameter 'q'")
  with pytest.raises(ConfigError, match="data x fsdp of size 4"):
    resolve(("batch",), DEFAULT_RULES, shape=(6,), mesh_shape=MESH)


def test_rank_mismatch():
  with pytest.raises(ConfigError, match="rank 3"):
    resolve(("embed",), DEFAULT_RULES, shape=(1, 2, 3), mesh_shape=MESH)


def test_format_rules_lists_every_rule():
  text = format_rules(DEFAULT_RULES)
  assert len(text.splitlines()) == len(DEFAULT_RULES)
  assert "batch" in text and "data x fsdp" in text and "replicated" in text
