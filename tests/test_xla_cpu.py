"""The XLA:CPU package: the one switch resolved per mesh and host, the stored cotangent's
barrier surviving compilation, and the in-place update ordering changing no value."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax import xla_cpu
from cosmos_jax.models import layers
from cosmos_jax.train import partition
from cosmos_jax.train.step import UpdateOrdering
from cosmos_jax.xla_cpu import donation, stack


def one_cpu_mesh():
  return partition.make_mesh((1, 1, 1), devices=jax.devices()[:1])


class FakeDevice:
  def __init__(self, platform):
    self.platform = platform


class FakeMesh:
  def __init__(self, platform, n):
    self.devices = np.array([FakeDevice(platform)] * n)


def test_auto_is_on_for_one_cpu_device_on_a_host_without_accelerators():
  on = xla_cpu.resolve('auto', one_cpu_mesh(), accelerator=None)
  assert on.enabled and isinstance(on.stack, stack.CpuBlockStack)
  assert isinstance(on.ordering, donation.InPlaceOrdering)


@pytest.mark.parametrize('mesh,accelerator', [
    (FakeMesh('cpu', 8), None),           # several host devices (the tests' own mesh)
    (FakeMesh('tpu', 4), None),           # a TPU program compiled ahead of time on a CPU host
    (FakeMesh('gpu', 1), '/dev/nvidia0'),
    (FakeMesh('cpu', 1), '/dev/nvidia0'),  # a CPU mesh on a GPU host: still never
])
def test_auto_is_off_everywhere_else(mesh, accelerator):
  off = xla_cpu.resolve('auto', mesh, accelerator=accelerator)
  assert not off.enabled and off.stack is None
  assert type(off.ordering) is UpdateOrdering
  tree = {'a': jnp.ones(3)}
  assert off.after_first_step(tree) is tree


def test_on_and_off_are_explicit():
  assert xla_cpu.resolve('on', one_cpu_mesh(), accelerator='/dev/nvidia0').enabled
  assert not xla_cpu.resolve('off', one_cpu_mesh(), accelerator=None).enabled
  with pytest.raises(ValueError, match='needs a mesh of one CPU device'):
    xla_cpu.resolve('on', FakeMesh('tpu', 4))
  with pytest.raises(ValueError, match='perf.cpu_tuning'):
    xla_cpu.resolve('fast', one_cpu_mesh())


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_the_one_trip_copy_is_exact(dtype):
  x = jnp.asarray([[-0.0, 1.5, -jnp.inf], [jnp.nan, 3e-38, 7.0]], dtype)
  for value in (x, x[::-1]):   # NaN first: two trips
    out = jax.jit(stack.one_trip_copy)(value)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(value, np.float32))
    assert np.array_equal(np.signbit(np.asarray(out, np.float32)),
                          np.signbit(np.asarray(value, np.float32)))
  assert jax.jit(stack.one_trip_copy)(jnp.zeros((0, 3), dtype)).shape == (0, 3)
  g = jax.grad(lambda v: jnp.sum(jnp.sin(stack.store_cotangent(v))))(jnp.arange(4.0))
  np.testing.assert_allclose(g, np.cos(np.arange(4.0)), rtol=1e-6)


def _stack_backward_hlo(n_layers, body_stack):
  transformer = layers.Transformer(n_layers, 2, stack=body_stack)
  x = jnp.ones((2, 9, 16))
  params = nn.Module.init(transformer, jax.random.key(0), x)   # its ``init`` field shadows it
  loss = lambda p, x: jnp.sum(jnp.sin(transformer.apply(p, x)))
  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()


def test_stored_cotangents_survive_compilation_and_keep_fusions_small():
  n_layers = 12
  hlo = _stack_backward_hlo(n_layers, stack.CpuBlockStack())
  assert len(re.findall(r' while\(', hlo)) == n_layers   # one per block boundary, none folded
  widest = lambda text: max(len(re.findall(r'%[\w.\-]+', m.group(1)))
                            for m in re.finditer(r' fusion\(([^)]*)\)', text))
  # Without them XLA:CPU fuses the running cotangent sum into every block: fusions read the
  # LayerNorm and projection gradients of all later blocks at once.
  plain = widest(_stack_backward_hlo(n_layers, None))
  stored = widest(hlo)
  assert stored * 3 < plain, (stored, plain)


def test_the_in_place_ordering_changes_no_value():
  ordering = donation.InPlaceOrdering()
  params = {'w': jnp.arange(6.0).reshape(2, 3), 'empty': jnp.zeros((0,))}
  teacher = {'w': -jnp.ones((2, 3)), 'empty': jnp.zeros((0,))}
  for new_teacher in (teacher, None):
    out = ordering.student_params(params, jnp.float32(3.5), new_teacher)
    jax.tree.map(np.testing.assert_array_equal, out, params)
  assert ordering.teacher_momentum(jnp.float32(0.999), jnp.float32(-7.0)) == jnp.float32(0.999)
  assert float(donation.zero_after(jnp.float32(jnp.inf))) == 0.0
