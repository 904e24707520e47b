"""The CPU demo: the tiny COSMOS on the embedded synthetic dataset (what `make demo` trains).

  cosmos-jax train --config configs/demo.py --workdir runs/demo           # COSMOS
  cosmos-jax train --config configs/demo.py:clip --workdir runs/demo_clip # CLIP-only baseline

600 steps at batch 32 on 8,000 generated 64 px images, 32 px global and 16 px local crops;
evaluated (teacher) on 400 val images at step 300 and at the end. The values live in
`cosmos_jax.demo.demo_config` so that `cosmos-jax demo` works from an installed package.
"""

from cosmos_jax.demo import demo_config


def get_config(arg: str = ''):
  return demo_config(arg)
