"""Random parameter trees for tests that need a model but not its real initialisation."""

import jax
import numpy as np

from cosmos_jax import models


def random_params(cfg, seed=0):
  """A random tree without compiling the initialiser (shapes from eval_shape)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
  return jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
