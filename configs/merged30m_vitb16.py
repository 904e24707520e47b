"""COSMOS ViT-B/16 on Merged-30M: the reference recipe, 32 epochs at global batch 4096.

The paper's headline checkpoint. Single host (every local accelerator), then the CLIP-only
baseline with the same budget:
  cosmos-jax train --config configs/merged30m_vitb16.py --workdir runs/merged30m_vitb16
  cosmos-jax train --config configs/merged30m_vitb16.py:clip --workdir runs/merged30m_vitb16_clip
TPU pod (64 chips x 64) and SLURM (8 nodes x 8 GPUs):
  launch/tpu_pod.sh --name NAME --zone ZONE --type v4-128 \
      --config configs/merged30m_vitb16.py --workdir /mnt/gcs/runs/merged30m_vitb16
  CONFIG=configs/merged30m_vitb16.py WORKDIR=/shared/runs/merged30m_vitb16 \
      sbatch --nodes=8 launch/slurm_gpu.sbatch

Data: the DreamLIP-recaptioned CC3M, CC12M and YFCC15M webdataset tars joined with '::' (TRAIN
below), the CC3M part from shard 0001 as in the reference script; override the placeholder
roots with --config.data.train='CC3M_PATTERN::CC12M_PATTERN::YFCC15M_PATTERN' (local or mounted
files; on a TPU pod, overrides go in the full command after `--`, see launch/tpu_pod.sh --help).
The epoch length uses the script's 26,899,071 samples, the sum of the three datasets although
shard 0000 of CC3M is left out. Eval: COCO val2017 retrieval under /data/coco each epoch.

Expected, from the official COSMOS checkpoint (README, spec 7; whether these are the teacher's
or the student's numbers is open, spec 5.1): COCO R@1 I2T 68.0 / T2I 52.5, Flickr30k R@1
I2T 92.9 / T2I 80.3, ImageNet zero-shot top-1 57.6. Training-free segmentation mIoU (teacher
with CSA, `cosmos-jax eval`; from a public listing, not the repository): VOC20 77.7,
Context59 33.7, COCO-Object 31.3, COCO-Stuff171 23.2, Cityscapes 34.7, ADE20K 17.7.

TPU fit (compiled with `cosmos-jax bench --tpu-topology NAME --config.mesh.shape='(1,N,1)'`
from a CPU machine, jax 0.10.2, libtpu 0.0.42.1; docs/tpu_recipes.md), float32, fsdp over all
N chips; step times are estimates from XLA's cost analysis (HBM-bound), not measurements:
  v5e-256 (1,256,1): 8.13 GiB of 16 GiB per chip (49% free), est. 0.22 s a step (2026-12-02)
  v4-128  (1,64,1):  27.91 GiB of 32 GiB per chip (13% free), est. 0.41 s a step (2026-12-07)
  v5e-64  (1,64,1), --config.model.dtype=bfloat16 --config.model.remat=True: 3.70 GiB of
          16 GiB (77% free), est. 0.50 s a step (2026-12-07)
  ViT-L/14 (--config.model.variant=ViT-L-14) on v5p-128 (1,64,1) needs model.remat=True
          (161 GiB of temporaries without): 13.84 GiB of 95 GiB with scanned layers (2026-12-07)
"""

from cosmos_jax.config import reference_recipe

TRAIN = ('/data/cc3m/cc3m-train-{0001..0575}.tar'
         '::/data/cc12m/cc12m-train-{0000..2175}.tar'
         '::/data/yfcc15m/yfcc15m-train-{0000..3636}.tar')


def get_config(arg: str = ''):
  # 6576 steps per epoch, 210,432 in all.
  return reference_recipe(arg, train=TRAIN, num_samples=26_899_071, batch_size=4096,
                          momentum=0.99)
