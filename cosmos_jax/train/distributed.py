"""Multi-host start-up: one ``jax.distributed.initialize`` for TPU pods, SLURM and explicit envs.

Every process runs the same program. ``initialize()`` must run before anything touches the
JAX backend (``jax.devices()``, a computation, ``device_put``). How it decides, in order:

  1. ``COSMOS_DISTRIBUTED=off``, or already initialised: nothing to do.
  2. Explicit values (arguments, else ``COSMOS_COORDINATOR_ADDRESS``/``JAX_COORDINATOR_ADDRESS``,
     ``COSMOS_NUM_PROCESSES``, ``COSMOS_PROCESS_ID``, ``COSMOS_LOCAL_DEVICE_IDS``/
     ``JAX_LOCAL_DEVICE_IDS``). One process means a single host: no-op.
  3. A SLURM step with more than one task (``SLURM_PROCID`` and ``SLURM_STEP_NUM_TASKS`` or
     ``SLURM_NTASKS`` > 1): coordinator = first node of the step's nodelist, and
     ``local_device_ids`` from the task layout (one task per node sees all its GPUs; one task
     per GPU sees its own). Explicit values override any of these.
  4. An Open MPI launch (``OMPI_COMM_WORLD_SIZE`` > 1): JAX's own detection.
  5. A Cloud TPU VM (JAX found libtpu and TPU chips): ``jax.distributed.initialize()`` with no
     arguments; it reads the worker list from the TPU metadata (or GKE env).
  6. Otherwise a single host: no-op (partial explicit values are an error).

With complete values JAX's cluster detection is switched off ('deactivate'): under SLURM it
would otherwise pin each process to one GPU even when it was meant to drive the whole node.

``COSMOS_CPU_COLLECTIVES=gloo`` (or ``mpi``) selects the cross-process collectives of the CPU
backend, needed for several CPU processes (``launch/local.sh``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

logger = logging.getLogger(__name__)

# Set once initialize() has run in this process; later calls return it unchanged.
_SUMMARY: Optional[dict] = None

CPU_COLLECTIVES = ('gloo', 'mpi')
# JAX's own default for SLURM: a port in the ephemeral range derived from the job id, so that
# every task computes the same one without talking to the others.
_SLURM_PORT_BASE = 65535 - 2**12 + 1


# ------------------------------------------------------------------------- env parsing

def expand_nodelist(nodelist: str) -> list[str]:
  """Expands a SLURM hostlist: ``'a[1-3,5],b7'`` -> ``['a1', 'a2', 'a3', 'a5', 'b7']``.

  Zero padding is kept (``node[08-10]`` -> node08, node09, node10) and several bracket groups
  in one name expand as a product (``r[1-2]n[1-2]``), as ``scontrol show hostnames`` does.
  """
  hosts = []
  for item in _split_top_level(nodelist.strip()):
    if item:
      hosts.extend(_expand_one(item))
  return hosts


def _split_top_level(text: str) -> list[str]:
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch == '[':
      depth += 1
    elif ch == ']':
      depth -= 1
      if depth < 0:
        raise ValueError(f'unbalanced brackets in nodelist {text!r}')
    elif ch == ',' and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth:
    raise ValueError(f'unbalanced brackets in nodelist {text!r}')
  parts.append(text[start:])
  return [p.strip() for p in parts]


def _expand_one(name: str) -> list[str]:
  m = re.search(r'\[([^\]]*)\]', name)
  if not m:
    return [name]
  prefix, suffix = name[:m.start()], name[m.end():]
  out = []
  for rng in m.group(1).split(','):
    rng = rng.strip()
    if '-' in rng:
      lo, hi = rng.split('-', 1)
      width = len(lo)
      values = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
    else:
      values = [rng]
    for v in values:
      out.extend(_expand_one(prefix + v + suffix))
  return out


def parse_tasks_per_node(value: str) -> list[int]:
  """SLURM's compact counts: ``'2(x3),1'`` -> ``[2, 2, 2, 1]``."""
  counts = []
  for item in value.split(','):
    m = re.fullmatch(r'\s*(\d+)(?:\(x(\d+)\))?\s*', item)
    if not m:
      raise ValueError(f'cannot parse SLURM tasks per node {value!r}')
    counts.extend([int(m.group(1))] * int(m.group(2) or 1))
  return counts


def _int_list(value: Optional[str]) -> Optional[list[int]]:
  if value is None or not value.strip():
    return None
  try:
    return [int(v) for v in value.split(',') if v.strip()]
  except ValueError:  # e.g. SLURM's CUDA_VISIBLE_DEVICES=NoDevFiles, or GPU UUIDs
    return None


def _env_int(env: Mapping[str, str], *names: str) -> Optional[int]:
  for name in names:
    if env.get(name, '').strip():
      return int(env[name])
  return None


def _visible_gpu_ids(env: Mapping[str, str]) -> Optional[list[int]]:
  """The GPU ordinals this task can address, as ``local_device_ids`` counts them.

  JAX's ``local_device_ids`` index the devices CUDA shows the process, i.e. after
  ``CUDA_VISIBLE_DEVICES`` masking: with CUDA_VISIBLE_DEVICES=4,5,6,7 they are 0..3.
  """
  cvd = env.get('CUDA_VISIBLE_DEVICES')
  if cvd is not None:
    items = [v for v in cvd.split(',') if v.strip()]  # indices, UUIDs or MIG names
    return list(range(len(items))) if items and items != ['NoDevFiles'] else None
  for name in ('SLURM_STEP_GPUS', 'SLURM_JOB_GPUS'):  # physical ids, no masking in effect
    ids = _int_list(env.get(name))
    if ids:
      return ids
  count = _env_int(env, 'SLURM_GPUS_ON_NODE')
  return list(range(count)) if count else None


def _slurm_tasks_on_node(env: Mapping[str, str], num_tasks: int) -> int:
  node_id = _env_int(env, 'SLURM_NODEID') or 0
  for name in ('SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE'):
    if env.get(name, '').strip():
      counts = parse_tasks_per_node(env[name])
      return counts[min(node_id, len(counts) - 1)]
  per_node = _env_int(env, 'SLURM_NTASKS_PER_NODE')
  if per_node:
    return per_node
  nodes = _env_int(env, 'SLURM_STEP_NUM_NODES', 'SLURM_JOB_NUM_NODES', 'SLURM_NNODES')
  return max(num_tasks // nodes, 1) if nodes else 1


def slurm_local_device_ids(env: Mapping[str, str], num_tasks: int) -> Optional[list[int]]:
  """This task's devices: all of the node's GPUs for one task per node, else its share.

  None (no GPU information: a CPU job) leaves every local device visible.
  """
  ids = _visible_gpu_ids(env)
  if ids is None:
    return None
  tasks = _slurm_tasks_on_node(env, num_tasks)
  local_id = _env_int(env, 'SLURM_LOCALID') or 0
  if tasks <= 1 or len(ids) == 1:  # the whole node, or a task already bound to one GPU
    return ids
  if len(ids) % tasks:
    raise ValueError(f'{tasks} SLURM tasks on this node cannot split its {len(ids)} GPUs '
                     f'{ids} evenly; use one task per node or one per GPU, or set '
                     f'COSMOS_LOCAL_DEVICE_IDS')
  per_task = len(ids) // tasks
  return ids[local_id * per_task:(local_id + 1) * per_task]


def _slurm_num_tasks(env: Mapping[str, str]) -> Optional[int]:
  if 'SLURM_PROCID' not in env:  # salloc shells and batch scripts outside srun have none
    return None
  return _env_int(env, 'SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'SLURM_NPROCS')


def resolve(env: Mapping[str, str], coordinator_address: Optional[str] = None,
            num_processes: Optional[int] = None, process_id: Optional[int] = None,
            local_device_ids: Optional[Sequence[int]] = None, *,
            on_tpu_vm: bool = False) -> tuple[str, Optional[dict[str, Any]]]:
  """(mode, kwargs for ``jax.distributed.initialize``); kwargs None means do nothing.

  Pure: reads only ``env``, so the decision is testable without a cluster.
  """
  if env.get('COSMOS_DISTRIBUTED', '').strip().lower() in ('0', 'off', 'false', 'no'):
    return 'disabled', None
  coordinator_address = (coordinator_address or env.get('COSMOS_COORDINATOR_ADDRESS')
                         or env.get('JAX_COORDINATOR_ADDRESS') or None)
  if num_processes is None:
    num_processes = _env_int(env, 'COSMOS_NUM_PROCESSES')
  if process_id is None:
    process_id = _env_int(env, 'COSMOS_PROCESS_ID')
  if local_device_ids is None:
    local_device_ids = (_int_list(env.get('COSMOS_LOCAL_DEVICE_IDS'))
                        or _int_list(env.get('JAX_LOCAL_DEVICE_IDS')))
  elif isinstance(local_device_ids, int):
    local_device_ids = [local_device_ids]

  if num_processes is not None and num_processes <= 1 and (process_id or 0) == 0:
    return 'single', None

  mode = 'explicit'
  slurm_tasks = _slurm_num_tasks(env)
  if None in (coordinator_address, num_processes, process_id) and (slurm_tasks or 0) > 1:
    mode = 'slurm'
    if num_processes is None:
      num_processes = slurm_tasks
    if process_id is None:
      process_id = int(env['SLURM_PROCID'])
    if coordinator_address is None:
      nodelist = (env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST')
                  or env.get('SLURM_NODELIST'))
      if not nodelist:
        raise ValueError('SLURM job without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / '
                         'SLURM_NODELIST; set COSMOS_COORDINATOR_ADDRESS')
      port = _env_int(env, 'COSMOS_COORDINATOR_PORT', 'JAX_COORDINATOR_PORT')
      if port is None:
        port = _SLURM_PORT_BASE + int(env.get('SLURM_JOB_ID', '0')) % 2**12
      coordinator_address = f'{expand_nodelist(nodelist)[0]}:{port}'
    if local_device_ids is None:
      local_device_ids = slurm_local_device_ids(env, num_processes)

  if None not in (coordinator_address, num_processes, process_id):
    if num_processes <= 1:
      return 'single', None
    if not 0 <= process_id < num_processes:
      raise ValueError(f'process id {process_id} is not in [0, {num_processes})')
    # Everything is known: switch JAX's cluster detection off, or under SLURM/Open MPI it
    # would restrict each process to one GPU (jax#16788, maxtext#865).
    return mode, {'coordinator_address': coordinator_address, 'num_processes': num_processes,
                  'process_id': process_id,
                  'local_device_ids': list(local_device_ids) if local_device_ids else None,
                  'cluster_detection_method': 'deactivate'}

  # Partial values go to JAX's own detection (TPU metadata, Open MPI), which fills the rest.
  given = {k: v for k, v in (('coordinator_address', coordinator_address),
                             ('num_processes', num_processes), ('process_id', process_id))
           if v is not None}
  if (_env_int(env, 'OMPI_COMM_WORLD_SIZE') or 0) > 1:
    if local_device_ids:
      given['local_device_ids'] = list(local_device_ids)
    return 'ompi', given
  if on_tpu_vm:
    return 'tpu', given   # TPU runtimes take no local_device_ids
  if given:
    missing = ', '.join(k for k in ('coordinator_address', 'num_processes', 'process_id')
                        if k not in given)
    raise ValueError(f'incomplete multi-process settings: {missing} not set (set '
                     f'COSMOS_COORDINATOR_ADDRESS, COSMOS_NUM_PROCESSES and COSMOS_PROCESS_ID)')
  return 'single', None


def _on_cloud_tpu_vm() -> bool:
  """JAX's own check at import (libtpu installed and TPU chips on PCI); no backend start."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


# --------------------------------------------------------------------------- entry points

def _set_cpu_collectives(env: Mapping[str, str]) -> Optional[str]:
  impl = env.get('COSMOS_CPU_COLLECTIVES', '').strip().lower()
  if not impl or impl == 'none':
    return None
  if impl not in CPU_COLLECTIVES:
    raise ValueError(f'COSMOS_CPU_COLLECTIVES={impl!r}; expected one of {CPU_COLLECTIVES}')
  jax.config.update('jax_cpu_collectives_implementation', impl)
  return impl


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None,
               initialization_timeout: Optional[int] = None) -> dict:
  """Joins the multi-process job (or does nothing on one host); returns a summary.

  Idempotent: later calls return the first call's summary.
  """
  global _SUMMARY
  if _SUMMARY is not None:
    logger.info('distributed: already initialised (%s)', _SUMMARY['mode'])
    return dict(_SUMMARY)

  env = os.environ
  if jax.distributed.is_initialized():
    mode, kwargs = 'preinitialized', None
  else:
    mode, kwargs = resolve(env, coordinator_address, num_processes, process_id,
                           local_device_ids, on_tpu_vm=_on_cloud_tpu_vm())
  collectives = None
  if kwargs is not None:
    collectives = _set_cpu_collectives(env)
    timeout = initialization_timeout or _env_int(env, 'COSMOS_INIT_TIMEOUT')
    if timeout:
      kwargs['initialization_timeout'] = timeout
    logger.info('distributed: %s initialisation, jax.distributed.initialize(%s)', mode,
                ', '.join(f'{k}={v!r}' for k, v in kwargs.items()))
    jax.distributed.initialize(**kwargs)

  summary = {
      'mode': mode,
      'process_index': jax.process_index(),
      'process_count': jax.process_count(),
      'local_device_count': jax.local_device_count(),
      'device_count': jax.device_count(),
      'platform': jax.devices()[0].platform,
      'coordinator_address': (kwargs or {}).get('coordinator_address'),
      'local_device_ids': (kwargs or {}).get('local_device_ids'),
      'cpu_collectives': collectives,
  }
  logger.info('distributed: process %d of %d, %d local / %d global %s devices (%s)',
              summary['process_index'], summary['process_count'],
              summary['local_device_count'], summary['device_count'], summary['platform'],
              mode)
  _SUMMARY = summary
  return dict(summary)


def is_primary() -> bool:
  """True on the process that writes logs, checkpoints' metadata and summaries."""
  return jax.process_index() == 0


def _is_device_data(x: Any) -> bool:
  if isinstance(x, jax.Array):
    return True
  # Strings and objects (the pipeline's 'keys') stay on the host.
  return isinstance(x, np.ndarray) and x.dtype.kind in 'biufc'


def host_local_batch_to_global(local_batch: Mapping[str, Any],
                               sharding: jax.sharding.Sharding | Mapping[str, Any]) -> dict:
  """This process's rows -> global ``jax.Array``s (the global batch = all processes' rows).

  Each process passes its own slice (batch / process_count rows); entries that are not
  numeric arrays (e.g. 'keys') are dropped. ``sharding`` is one sharding or one per key.
  """
  out = {}
  for name, value in local_batch.items():
    if not _is_device_data(value):
      continue
    sh = sharding[name] if isinstance(sharding, Mapping) else sharding
    out[name] = jax.make_array_from_process_local_data(sh, value)
  return out


def allgather_json(obj: Any) -> list[Any]:
  """The JSON-serialisable ``obj`` of every process, in process order (a collective)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]
