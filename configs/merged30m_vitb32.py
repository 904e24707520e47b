"""COSMOS ViT-B/32 on Merged-30M: the B/16 recipe with the B/32 model, 32 epochs at batch 4096.

The reference has no B/32 train script; its released B/32 checkpoints presumably used the
B/16 flags with `--model ViT-B-32` (spec 4.1), which is what this is. Single host (every local
accelerator), then the CLIP-only baseline with the same budget:
  cosmos-jax train --config configs/merged30m_vitb32.py --workdir runs/merged30m_vitb32
  cosmos-jax train --config configs/merged30m_vitb32.py:clip --workdir runs/merged30m_vitb32_clip
TPU pod (64 chips x 64) and SLURM (8 nodes x 8 GPUs):
  launch/tpu_pod.sh --name NAME --zone ZONE --type v4-128 \
      --config configs/merged30m_vitb32.py --workdir /mnt/gcs/runs/merged30m_vitb32
  CONFIG=configs/merged30m_vitb32.py WORKDIR=/shared/runs/merged30m_vitb32 \
      sbatch --nodes=8 launch/slurm_gpu.sbatch

Data: as configs/merged30m_vitb16.py (CC3M shards 0001..0575, CC12M, YFCC15M joined with '::';
override with --config.data.train=..., on a TPU pod in the full command after `--`).

TPU fit (`cosmos-jax bench --tpu-topology v5e-256 --config.mesh.shape='(1,256,1)'` from a CPU
machine, 2026-12-07, jax 0.10.2, libtpu 0.0.42.1; docs/tpu_recipes.md): float32, fsdp over 256
v5e chips, 5.50 GiB of 16 GiB per chip (66% free); est. 0.15 s a step (an estimate from XLA's
cost analysis, HBM-bound, not a measurement).
Eval: COCO val2017 retrieval under /data/coco each epoch.

Expected, from the official COSMOS checkpoint (README, spec 7; whether these are the teacher's
or the student's numbers is open, spec 5.1): COCO R@1 I2T 64.3 / T2I 48.4, Flickr30k R@1
I2T 89.9 / T2I 76.1, ImageNet zero-shot top-1 53.4.
"""

from cosmos_jax.config import reference_recipe

TRAIN = ('/data/cc3m/cc3m-train-{0001..0575}.tar'
         '::/data/cc12m/cc12m-train-{0000..2175}.tar'
         '::/data/yfcc15m/yfcc15m-train-{0000..3636}.tar')


def get_config(arg: str = ''):
  # 6576 steps per epoch, 210,432 in all.
  return reference_recipe(arg, train=TRAIN, num_samples=26_899_071, batch_size=4096,
                          momentum=0.99, variant='ViT-B-32')
