"""COSMOS ViT-B/16 on PixelProse: the reference recipe, 32 epochs at global batch 4096.

Single host (every local accelerator), then the CLIP-only baseline with the same budget:
  cosmos-jax train --config configs/pixelprose_vitb16.py --workdir runs/pixelprose_vitb16
  cosmos-jax train --config configs/pixelprose_vitb16.py:clip --workdir runs/pixelprose_vitb16_clip
TPU pod (64 chips x 64) and SLURM (8 nodes x 8 GPUs):
  launch/tpu_pod.sh --name NAME --zone ZONE --type v4-128 \
      --config configs/pixelprose_vitb16.py --workdir /mnt/gcs/runs/pixelprose_vitb16
  CONFIG=configs/pixelprose_vitb16.py WORKDIR=/shared/runs/pixelprose_vitb16 sbatch --nodes=8 \
      launch/slurm_gpu.sbatch --config.data.train='/mnt/pixelprose/{00000..01699}.tar'

Data: PixelProse (HF tomg-group-umd/pixelprose) as webdataset tars, image + json with
`original_caption` and the long VLM `caption` (split into sentences on the fly), 15,037,386
samples; override the placeholder root with --config.data.train=PATTERN (tar shards on a local
or mounted filesystem, or an ArrayRecord dir from `cosmos-jax data convert`).
On a TPU pod, overrides go in the full command after `--` (launch/tpu_pod.sh --help).
Eval: COCO val2017 retrieval under /data/coco each epoch.

Expected, from the official COSMOS checkpoint (README, spec 7; whether these are the teacher's
or the student's numbers is open, spec 5.1): COCO R@1 I2T 62.4 / T2I 43.4, Flickr30k R@1
I2T 89.9 / T2I 73.6, ImageNet zero-shot top-1 59.6.
"""

from cosmos_jax.config import reference_recipe


def get_config(arg: str = ''):
  # 3680 steps per epoch, 117,760 in all.
  return reference_recipe(arg, train='/data/pixelprose/{00000..01699}.tar',
                          num_samples=15_037_386, batch_size=4096, momentum=0.99,
                          text_mode='textcrop_pixelprose')
