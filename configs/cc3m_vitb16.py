"""COSMOS ViT-B/16 on CC3M-recap: the reference recipe, 32 epochs at global batch 1024.

Single host (every local accelerator), then the CLIP-only baseline with the same budget:
  cosmos-jax train --config configs/cc3m_vitb16.py --workdir runs/cc3m_vitb16
  cosmos-jax train --config configs/cc3m_vitb16.py:clip --workdir runs/cc3m_vitb16_clip
TPU pod (16 chips x 64, as the reference's 16 GPUs) and SLURM (2 nodes x 8 GPUs):
  launch/tpu_pod.sh --name NAME --zone ZONE --type v4-32 \
      --config configs/cc3m_vitb16.py --workdir /mnt/gcs/runs/cc3m_vitb16
  CONFIG=configs/cc3m_vitb16.py WORKDIR=/shared/runs/cc3m_vitb16 sbatch --nodes=2 \
      launch/slurm_gpu.sbatch --config.data.train='/mnt/cc3m/cc3m-train-{0000..0575}.tar'

Data: DreamLIP-recaptioned CC3M as webdataset tars (image + json with the 7 caption lists),
2,823,019 samples; override the placeholder root with --config.data.train=PATTERN (tar shards
on a local or mounted filesystem, or an ArrayRecord dir from `cosmos-jax data convert`).
On a TPU pod, overrides go in the full command after `--` (launch/tpu_pod.sh --help).

TPU fit (`cosmos-jax bench --tpu-topology v5e-64 --config.mesh.shape='(1,64,1)'` from a CPU
machine, 2026-12-07, jax 0.10.2, libtpu 0.0.42.1; docs/tpu_recipes.md): float32, fsdp over 64
v5e chips, 8.14 GiB of 16 GiB per chip (49% free); est. 0.20 s a step (an estimate from XLA's
cost analysis, HBM-bound, not a measurement).
Eval: COCO val2017 retrieval under /data/coco each epoch (the reference's CC3M script
evaluates on CC3M val shards instead).

Expected, from the official COSMOS checkpoint (README, spec 7; whether these are the teacher's
or the student's numbers is open, spec 5.1): COCO R@1 I2T 53.1 / T2I 40.1, Flickr30k R@1
I2T 84.1 / T2I 68.6, ImageNet zero-shot top-1 37.1.
"""

from cosmos_jax.config import reference_recipe


def get_config(arg: str = ''):
  # 2768 steps per epoch, 88,576 in all.
  return reference_recipe(arg, train='/data/cc3m/cc3m-train-{0000..0575}.tar',
                          num_samples=2_823_019, batch_size=1024, momentum=0.999)
