"""COSMOS ViT-B/16 on YFCC15M-recap: the reference recipe, 32 epochs at global batch 4096.

Single host (every local accelerator), then the CLIP-only baseline with the same budget:
  cosmos-jax train --config configs/yfcc15m_vitb16.py --workdir runs/yfcc15m_vitb16
  cosmos-jax train --config configs/yfcc15m_vitb16.py:clip --workdir runs/yfcc15m_vitb16_clip
TPU pod (64 chips x 64) and SLURM (8 nodes x 8 GPUs):
  launch/tpu_pod.sh --name NAME --zone ZONE --type v4-128 \
      --config configs/yfcc15m_vitb16.py --workdir /mnt/gcs/runs/yfcc15m_vitb16
  CONFIG=configs/yfcc15m_vitb16.py WORKDIR=/shared/runs/yfcc15m_vitb16 sbatch --nodes=8 \
      launch/slurm_gpu.sbatch --config.data.train='/mnt/yfcc15m/yfcc15m-train-{0000..3636}.tar'

Data: DreamLIP-recaptioned YFCC15M as webdataset tars (image + json with the 7 caption lists),
14,065,827 samples; override the placeholder root with --config.data.train=PATTERN (tar shards
on a local or mounted filesystem, or an ArrayRecord dir from `cosmos-jax data convert`).
On a TPU pod, overrides go in the full command after `--` (launch/tpu_pod.sh --help).
Eval: COCO val2017 retrieval under /data/coco each epoch.

Expected, from the official COSMOS checkpoint (README, spec 7; whether these are the teacher's
or the student's numbers is open, spec 5.1): COCO R@1 I2T 67.5 / T2I 50.9, Flickr30k R@1
I2T 92.6 / T2I 79.6, ImageNet zero-shot top-1 52.4.
"""

from cosmos_jax.config import reference_recipe


def get_config(arg: str = ''):
  # 3440 steps per epoch, 110,080 in all.
  return reference_recipe(arg, train='/data/yfcc15m/yfcc15m-train-{0000..3636}.tar',
                          num_samples=14_065_827, batch_size=4096, momentum=0.99)
