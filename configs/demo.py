"""The CPU demo: the tiny COSMOS on the embedded synthetic dataset (what `make demo` trains).

  cosmos-jax train --config configs/demo.py --workdir runs/demo           # COSMOS
  cosmos-jax train --config configs/demo.py:clip --workdir runs/demo_clip # CLIP-only baseline

The tiny towers at 64 px (8 px patches), 1,000 steps at batch 32 and lr 2e-3 on 8,000 generated
64 px images, 64 px global and 6 x 32 px local crops; evaluated (teacher) on 400 val images at
step 500 and at the end (docs/demo.md). The values live in
`cosmos_jax.demo.demo_config` so that `cosmos-jax demo` works from an installed package.
"""

from cosmos_jax.demo import demo_config


def get_config(arg: str = ''):
  return demo_config(arg)
