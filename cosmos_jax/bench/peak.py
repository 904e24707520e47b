"""The machine's measured matmul peak: what "fraction of peak" is a fraction of.

A datasheet peak says little on a CPU (clock, vector width and core sharing vary), so the
peak is measured in the same run: square ``jnp.dot`` products, one per device of the mesh
at once, after a warm-up, timed as the median of repeats. Forced host devices on a CPU share
its cores, so running them together measures the machine, not one fake device.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Big enough to be compute-bound on each backend, small enough to be quick.
_SIZE = {'cpu': 2048, 'gpu': 8192, 'tpu': 8192}
_MIN_REPEAT_S = 0.05   # chain calls until one timed repeat lasts at least this long


def default_size(backend: Optional[str] = None) -> int:
  return _SIZE.get(backend or jax.default_backend(), 4096)


def matmul_peak(dtype: Any = jnp.float32, *, size: Optional[int] = None,
                mesh: Optional[Mesh] = None, repeats: int = 5) -> dict[str, Any]:
  """{'flops_per_s', 'size', 'dtype', 'devices'}: FLOP/s of all the mesh's devices together."""
  devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
  n = len(devices)
  if size is None:
    size = default_size(devices[0].platform)
    if devices[0].platform == 'cpu' and n > 1:
      # Forced host devices share the cores: hold the total work at one product's.
      size = max(512, round(size / n ** (1 / 3) / 128) * 128)
  sharding = NamedSharding(Mesh(devices, ('d',)), P('d'))
  a = jax.device_put(jnp.ones((n, size, size), dtype), sharding)
  b = jax.device_put(jnp.full((n, size, size), 0.5, dtype), sharding)
  # Plain dot at default precision: what the model's matmuls run at in this dtype.
  matmul = jax.jit(lambda x, y: jnp.einsum('bij,bjk->bik', x, y), out_shardings=sharding)
  jax.block_until_ready(matmul(a, b))   # compiles
  start = time.perf_counter()
  jax.block_until_ready(matmul(a, b))
  calls = max(1, int(_MIN_REPEAT_S / max(time.perf_counter() - start, 1e-9)))
  times = []
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    for _ in range(calls):   # one device stream runs them in order: the last is the end
      out = matmul(a, b)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  seconds = statistics.median(times)
  return {'flops_per_s': n * 2 * size ** 3 / seconds, 'size': size,
          'dtype': jnp.dtype(dtype).name, 'devices': n}
