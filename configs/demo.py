"""The CPU demo: the tiny COSMOS on the embedded synthetic dataset.

  cosmos-jax train --config configs/demo.py --workdir runs/demo
"""

from cosmos_jax.config import base_config


def get_config(arg: str = ''):
  c = base_config()
  c.model.variant = 'tiny'
  c.batch_size = 32
  c.total_steps = 600
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.1
  c.ema.momentum = 0.99
  c.data.train = 'synthetic:train'
  c.data.synthetic.image_size = 64
  c.data.synthetic.num_train = 8000
  c.data.synthetic.num_val = 400
  c.data.global_size, c.data.local_size = 32, 16
  c.data.worker_count = 0
  c.mesh.shape = (-1, 1, 1)
  c.mesh.preset = 'dp'
  c.checkpoint.every_steps = 200
  c.log_every_steps = 25
  c.eval.tasks = ('synthetic',)
  c.eval.every_steps = 300
  c.eval.batch_size = 200
  if arg == 'clip':   # the CLIP-only baseline with the same budget
    c.model.cosmos = False
    c.eval.which = 'student'
  return c
