"""The COSMOS contrastive terms over a batch sharded across devices, with explicit collectives.

The same function as ``losses.clip_loss`` on global arrays, written per device inside
``jax.shard_map`` over the mesh's batch axes (open_clip's local-loss formulation):

* each column stack (the side of a term with fewer views: the 2 global image views, the
  teacher's 2 + 2) is all-gathered once, however many terms and pairs read it; inside
  ``shard_map`` the transpose of that gather is one reduce-scatter of its gradient;
* a device scores only its own n = N / D rows against the N gathered columns, so a pair holds
  an (n, N) logits block, not (N, N); the row direction (CE over a row) is then local;
* the column direction needs the log-sum-exp over all N rows of a column: each device takes
  it over its own rows, for every pair of every term; after the pair loops, one all-reduce
  (max) of these partial values gives each column's largest, and one reduce-scatter of their
  exponentials relative to it gives every device the sums for its own n columns (stable, and
  exact up to float rounding); the positive of column c is entry (c, c), held by the device
  that owns row c, so both directions sum over local indices;
* the per-term sums are all-reduced (psum) into the global means.

Per pair and device: one (n, E) x (E, N) matmul, the global formulation's share. Per step:
one all-gather per column stack, one all-reduce and one reduce-scatter of (pairs, N) floats,
one psum of the terms, and their transposes in the backward; none inside the pair loops (an
all-to-all would do the column step in one collective, but XLA:TPU took about 20 s to compile
each one over 256 chips).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

# (a key, b key, scale key) of one clip_loss(a, b, scale).
Term = tuple[str, str, str]


def batch_shards(mesh: Mesh, batch_axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes)


def _pair_parts(a: jax.Array, b_all: jax.Array, scale: jax.Array,
                offset: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One pair on this device's rows a (n, E) against all columns b_all (N, E).

  Returns the row direction's sum of CE over the local rows minus the column direction's
  local positives, and the (N,) log-sum-exp of each column over the local rows.
  """
  n = a.shape[0]
  # Default matmul precision, as in losses._pair_loss.
  logits = scale * jnp.matmul(a, b_all.T)                                     # (n, N)
  diag = jnp.diagonal(jax.lax.dynamic_slice_in_dim(logits, offset, n, axis=1))
  row = jax.nn.logsumexp(logits, axis=1)
  return jnp.sum(row - diag) - jnp.sum(diag), jax.nn.logsumexp(logits, axis=0)


def _term_parts(a: jax.Array, b_all: jax.Array, scale: jax.Array, offset: jax.Array,
                pair_logits_bytes: int) -> tuple[jax.Array, jax.Array]:
  """``_pair_parts`` of all Va x Vb pairs, in rematerialised groups of pairs.

  One scan over a's views per view of b (Vb = 2 in COSMOS), each step taking a group of a's
  views against that view. The gathered b is only sliced by a static index: a scan over
  pair indices into it made XLA materialise b once per pair (Va * Vb * N * E per device).
  Returns the (Vb * Va,) local sums and the (Vb * Va, N) partial column log-sum-exps.
  """
  block_bytes = 4 * a.shape[1] * b_all.shape[1]
  per_group = max(1, min(a.shape[0], pair_logits_bytes // block_bytes))
  pair = jax.checkpoint(lambda x, y: _pair_parts(x, y, scale, offset))
  sums, cols = [], []
  for j in range(b_all.shape[0]):
    b_j = b_all[j]
    s, c = jax.lax.map(lambda a_i: pair(a_i, b_j), a, batch_size=per_group)
    sums.append(s)
    cols.append(c)
  return jnp.concatenate(sums), jnp.concatenate(cols)


def sharded_clip_losses(stacks: Mapping[str, jax.Array], scales: Mapping[str, jax.Array],
                        terms: Sequence[Term], mesh: Mesh, batch_axes: Sequence[str],
                        pair_logits_bytes: int) -> list[jax.Array]:
  """``[clip_loss(stacks[a], stacks[b], scales[s]) for a, b, s in terms]``, sharded.

  stacks: float32 (V, N, E) arrays, N split over ``batch_axes`` (other mesh axes replicate
  the computation); scales: exponentiated logit scales. Of each term's two stacks, the one
  with fewer views is the gathered (column) side.
  """
  axes = tuple(batch_axes)
  shards = batch_shards(mesh, axes)
  n_global = next(iter(stacks.values())).shape[1]
  for key, x in stacks.items():
    if x.ndim != 3 or x.shape[1] != n_global:
      raise ValueError(f'stack {key!r} must be (V, {n_global}, E), got {x.shape}.')
  if n_global % shards:
    raise ValueError(f'the loss batch {n_global} is not divisible by the {shards} devices of '
                     f'the batch axes {axes}.')
  # The loss is symmetric in its two stacks: the one with fewer views is gathered.
  oriented = [(b, a, s) if stacks[a].shape[0] < stacks[b].shape[0] else (a, b, s)
              for a, b, s in terms]
  columns = sorted({c for _, c, _ in oriented})
  stack_keys = sorted(stacks)
  scale_keys = sorted(scales)
  n_local = n_global // shards

  def per_device(local: tuple, scale_values: tuple) -> tuple:
    local = dict(zip(stack_keys, local))
    # Varying from here on, so that their gradient's psum runs once, not in every loop step.
    scale_of = {k: jax.lax.pcast(v, axes, to='varying')
                for k, v in zip(scale_keys, scale_values)}
    gathered = {c: jax.lax.all_gather(local[c], axes, axis=1, tiled=True) for c in columns}
    offset = jax.lax.axis_index(axes) * n_local
    parts = [_term_parts(local[r], gathered[c], scale_of[s], offset, pair_logits_bytes)
             for r, c, s in oriented]
    # All pairs' partial column log-sum-exps (pairs, N) combined at once: exp relative to
    # the maximum over devices, summed over devices into this device's n columns.
    partial = jnp.concatenate([c for _, c in parts])
    peak = jax.lax.pmax(jax.lax.stop_gradient(partial), axes)
    sums = jax.lax.psum_scatter(jnp.exp(partial - peak), axes, scatter_dimension=1, tiled=True)
    col = jnp.log(sums) + jax.lax.dynamic_slice_in_dim(peak, offset, n_local, axis=1)
    col_sums = jnp.sum(col, axis=1)
    local_totals, start = [], 0
    for local_sums, _ in parts:
      stop = start + local_sums.shape[0]
      local_totals.append(0.5 * (jnp.sum(local_sums) + jnp.sum(col_sums[start:stop])))
      start = stop
    pairs = jnp.asarray([len(s) for s, _ in parts], jnp.float32)
    return tuple(jax.lax.psum(jnp.stack(local_totals), axes) / (pairs * n_global))

  spec = P(None, axes, None)
  fn = jax.shard_map(per_device, mesh=mesh,
                     in_specs=((spec,) * len(stack_keys), (P(),) * len(scale_keys)),
                     out_specs=(P(),) * len(terms))
  return list(fn(tuple(stacks[k] for k in stack_keys), tuple(scales[k] for k in scale_keys)))
