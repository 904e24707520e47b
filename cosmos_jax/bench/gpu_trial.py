"""One trial of the GPU benchmark: the train step at one batch size and attention kernel.

A trial builds the step exactly as training does (``train.from_config.build_train_step`` on a
one-device mesh), compiles it (timed), runs one step from a fresh state to take a
*fingerprint* (the loss and the gradients, for the cross-kernel parity check), then times
the step as the median of repeats (``timing.median_seconds``) and reads the device's peak
memory. An out-of-memory at compile or run is a result (``oom``), not a crash.

The gradients come out of the step itself: AdamW's first moment after one step from zero
is ``(1 - b1) * g``, so ``g = mu / (1 - b1)``, with no second differentiation written here.

On a GPU each trial runs in its own process (``run_in_subprocess``): the allocator's peak
is then that trial's alone, an out-of-memory cannot leave a broken context behind, and the
parent never holds GPU memory while a child needs it.

  python -m cosmos_jax.bench.gpu_trial < spec.json   # prints the result as one JSON line
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import optax

from cosmos_jax.bench.build import concrete_inputs
from cosmos_jax.bench.memory import add_stats
from cosmos_jax.bench.timing import median_seconds
from cosmos_jax.train import partition
from cosmos_jax.train.from_config import build_train_step

OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'out of memory', 'Out of memory', 'OOM when allocating')
# The GPU allocator's share of device memory in a trial's process (JAX's default is 75%):
# "the largest batch that fits" should mean the device's memory, not three quarters of it.
GPU_MEMORY_FRACTION = '0.94'


def is_out_of_memory(text: str) -> bool:
  return any(marker in text for marker in OOM_MARKERS)


def trial_spec(config: ml_collections.ConfigDict, attention: str, batch: int, repeats: int,
               fingerprint_path: Optional[str] = None, seed: int = 0) -> dict[str, Any]:
  """What a trial needs, as JSON-able values (it crosses a process boundary on GPU)."""
  return {'config': config.to_json(), 'attention': attention, 'batch': int(batch),
          'repeats': int(repeats), 'fingerprint_path': fingerprint_path, 'seed': int(seed)}


def _trial_config(spec: dict[str, Any]) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(json.loads(spec['config']))
  config.batch_size = spec['batch']
  config.model.attention = spec['attention']
  config.mesh.shape = (1, 1, 1)
  return config


def first_moment(opt_state: Any) -> Any:
  """The Adam first moment ``mu`` (a tree like the parameters) inside the optimizer state."""
  found = []

  def visit(node):
    if isinstance(node, optax.ScaleByAdamState):
      found.append(node.mu)
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif hasattr(node, '_fields'):   # other optax states are NamedTuples too
      for child in node:
        visit(child)
  visit(opt_state)
  if len(found) != 1:
    raise ValueError(f'expected one Adam state in the optimizer state, found {len(found)}')
  return found[0]


def flat_leaves(tree: Any) -> dict[str, np.ndarray]:
  """{'vision/blocks_0/...': float32 array} for every leaf, names from the tree paths."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    out[name] = np.asarray(jax.device_get(leaf), np.float32)
  return out


def save_fingerprint(path: str, loss: float, grads: dict[str, np.ndarray]) -> None:
  np.savez(path, __loss__=np.float64(loss), **grads)


def versions() -> dict[str, str]:
  import flax
  import jaxlib
  return {'python': sys.version.split()[0], 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'flax': flax.__version__, 'optax': optax.__version__}


def _memory_stats(device: jax.Device) -> dict[str, Optional[int]]:
  try:
    stats = device.memory_stats() or {}
  except (NotImplementedError, RuntimeError):   # CPU client: no allocator statistics
    stats = {}
  return {'peak_bytes_in_use': stats.get('peak_bytes_in_use'),
          'bytes_limit': stats.get('bytes_limit')}


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
  """Runs one trial in this process; never raises for an out-of-memory or a failed build."""
  start = time.perf_counter()
  config = _trial_config(spec)
  device = jax.devices()[0]
  result: dict[str, Any] = {'attention': spec['attention'], 'batch': spec['batch'],
                            'device_kind': device.device_kind, 'platform': device.platform,
                            'versions': versions(), 'ok': False, 'oom': False}
  try:
    result.update(_measure(config, spec, device))
    result['ok'] = True
  except Exception as e:   # reported, and the search decides what it means
    text = f'{type(e).__name__}: {e}'
    result['oom'] = is_out_of_memory(text)
    result['error'] = text.strip().splitlines()[0][:500]
  result.update(_memory_stats(device))
  result['wall_s'] = time.perf_counter() - start
  return result


def _measure(config: ml_collections.ConfigDict, spec: dict[str, Any],
             device: jax.Device) -> dict[str, Any]:
  t0 = time.perf_counter()
  mesh = partition.make_mesh((1, 1, 1), [device])
  build = build_train_step(config, mesh)
  state, batch = concrete_inputs(build, config.batch_size, spec['seed'])
  out: dict[str, Any] = {'setup_s': time.perf_counter() - t0}   # build, state, batch
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = build.train_step.lower(state, batch).compile()
    out['compile_s'] = time.perf_counter() - t0
    out['compiled_memory'] = add_stats({}, compiled.memory_analysis())
    state, metrics = compiled(state, batch)   # the state is donated: keep the new one
    out['loss'] = float(metrics['total_loss'])
    out['grad_norm'] = float(metrics['grad_norm'])
    if spec.get('fingerprint_path'):
      mu = first_moment(state['opt_state'])
      grads = {k: v / (1.0 - config.optim.b1) for k, v in flat_leaves(mu).items()}
      save_fingerprint(spec['fingerprint_path'], out['loss'], grads)
      out['fingerprint_path'] = spec['fingerprint_path']
    holder = {'state': build.after_first_step(state)}   # as the training loop has it
    del state

    def one():
      holder['state'], step_metrics = compiled(holder['state'], batch)
      return holder['state'], step_metrics   # wait for the update too, not only the metrics

    out['step_s'] = median_seconds(one, spec['repeats'])
  out['samples_per_s'] = config.batch_size / out['step_s']
  return out


def _child_env(cache_dir: Optional[str]) -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', GPU_MEMORY_FRACTION)
  if cache_dir:   # the state's initialisation is the same program in every trial
    env.setdefault('JAX_COMPILATION_CACHE_DIR', cache_dir)
  return env


def run_in_subprocess(spec: dict[str, Any], timeout_s: float,
                      cache_dir: Optional[str] = None) -> dict[str, Any]:
  """The trial in a fresh interpreter; a crash or a timeout comes back as a failed result.

  ``cache_dir``: a compilation cache shared by the trials' processes."""
  base = {'attention': spec['attention'], 'batch': spec['batch'], 'ok': False, 'oom': False}
  start = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, '-m', 'cosmos_jax.bench.gpu_trial'],
                          input=json.dumps(spec), capture_output=True, text=True,
                          env=_child_env(cache_dir), timeout=max(timeout_s, 1.0))
  except subprocess.TimeoutExpired:
    return {**base, 'error': f'trial timed out after {timeout_s:.0f} s',
            'wall_s': time.perf_counter() - start}
  lines = proc.stdout.strip().splitlines()
  if proc.returncode == 0 and lines:
    try:
      return json.loads(lines[-1])
    except json.JSONDecodeError:
      pass
  tail = proc.stderr.strip().splitlines()[-20:]
  text = '\n'.join(tail) or 'no output'
  return {**base, 'oom': is_out_of_memory(proc.stderr),
          'error': f'trial process exited with {proc.returncode}: {tail[-1] if tail else text}',
          'wall_s': time.perf_counter() - start}


def _main() -> None:
  spec = json.loads(sys.stdin.read())
  print(json.dumps(run_trial(spec)))


if __name__ == '__main__':
  _main()
