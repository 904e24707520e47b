"""COSMOS ViT-B/16 on CC12M-recap: the reference recipe, 32 epochs at global batch 4096.

Single host (every local accelerator), then the CLIP-only baseline with the same budget:
  cosmos-jax train --config configs/cc12m_vitb16.py --workdir runs/cc12m_vitb16
  cosmos-jax train --config configs/cc12m_vitb16.py:clip --workdir runs/cc12m_vitb16_clip
TPU pod (64 chips x 64) and SLURM (8 nodes x 8 GPUs):
  launch/tpu_pod.sh --name NAME --zone ZONE --type v4-128 \
      --config configs/cc12m_vitb16.py --workdir /mnt/gcs/runs/cc12m_vitb16
  CONFIG=configs/cc12m_vitb16.py WORKDIR=/shared/runs/cc12m_vitb16 sbatch --nodes=8 \
      launch/slurm_gpu.sbatch --config.data.train='/mnt/cc12m/cc12m-train-{0000..2175}.tar'

Data: DreamLIP-recaptioned CC12M as webdataset tars (image + json with the 7 caption lists),
10,010,225 samples; override the placeholder root with --config.data.train=PATTERN (tar shards
on a local or mounted filesystem, or an ArrayRecord dir from `cosmos-jax data convert`).
On a TPU pod, overrides go in the full command after `--` (launch/tpu_pod.sh --help).
Eval: COCO val2017 retrieval under /data/coco each epoch.

Expected, from the official COSMOS checkpoint (README, spec 7; whether these are the teacher's
or the student's numbers is open, spec 5.1): COCO R@1 I2T 64.2 / T2I 48.9, Flickr30k R@1
I2T 91.4 / T2I 76.2, ImageNet zero-shot top-1 51.4.
"""

from cosmos_jax.config import reference_recipe


def get_config(arg: str = ''):
  # 2448 steps per epoch, 78,336 in all.
  return reference_recipe(arg, train='/data/cc12m/cc12m-train-{0000..2175}.tar',
                          num_samples=10_010_225, batch_size=4096, momentum=0.99)
