"""Evaluation inside a training run: the config's tasks on the current student and/or teacher.

The tasks are parsed when the run starts, so a missing dataset folder fails before anything
compiles. Each evaluation writes ``eval/step_<N>/<tree>/`` (results.json/.md and the PNGs)
under the work directory and returns flat scalars (``eval/<tree>/<task>/<dataset>/<metric>``)
for metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import tempfile
from typing import Any, Mapping

import ml_collections
from jax.sharding import Mesh

from cosmos_jax.data.synthetic import config_from_fields
from cosmos_jax.eval import report, run
from cosmos_jax.models import ModelConfig, unstack_layers
from cosmos_jax.train import distributed
from cosmos_jax.train.from_config import compute_dtype


class InLoopEval:

  def __init__(self, config: ml_collections.ConfigDict, model_config: ModelConfig,
               workdir: str, mesh: Mesh):
    e = config.eval
    self.tasks = [run.parse_task(t) for t in e.tasks]
    self.every_steps = e.every_steps
    self.trees = ('student', 'teacher') if e.which == 'both' else (e.which,)
    self.batch_size = e.batch_size
    self.model_config, self.workdir, self.mesh = model_config, workdir, mesh
    self.dtype = compute_dtype(config)
    # The validation split of the generator the run trains on, every field of it.
    self.synthetic = config_from_fields(config.data.synthetic.to_dict())

  def due(self, step: int, last_step: int) -> bool:
    if not self.tasks:
      return False
    return step == last_step or (self.every_steps > 0 and step % self.every_steps == 0)

  def out_dir(self, step: int, tree: str) -> str:
    return os.path.join(self.workdir, 'eval', f'step_{step}', tree)

  def __call__(self, step: int, state: Mapping[str, Any]) -> dict[str, float]:
    """Runs every task on every chosen tree; returns the flat scalar results."""
    scalars: dict[str, float] = {}
    primary = distributed.is_primary()
    for tree in self.trees:
      params = state['params'] if tree == 'student' else state['teacher_params']
      logging.info('step %d: evaluating the %s', step, tree)
      # Every host takes part in the sharded encoders; only the primary keeps the files.
      with contextlib.ExitStack() as scratch:
        out_dir = (self.out_dir(step, tree) if primary
                   else scratch.enter_context(tempfile.TemporaryDirectory()))
        results = run.run(self.model_config, unstack_layers(params), self.tasks, out_dir,
                          mesh=self.mesh, dtype=self.dtype, batch_size=self.batch_size,
                          synthetic_config=self.synthetic, progress=primary)
      for task, dataset, metric, value in report.rows(results):
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
          scalars[f'eval/{tree}/{task}/{dataset}/{metric}'] = float(value)
    return scalars
