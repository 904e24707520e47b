"""The objects a run is built from, read off its config (model, data pipeline, source)."""

from __future__ import annotations

import ml_collections

from cosmos_jax import models
from cosmos_jax.data import augment, captions, pipeline
from cosmos_jax.data.sources import open_source


def model_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  return models.get_variant(config.model.variant, cosmos=config.model.cosmos)


def pipeline_config(config: ml_collections.ConfigDict) -> pipeline.PipelineConfig:
  d = config.data
  return pipeline.PipelineConfig(
      global_batch_size=config.batch_size, seed=config.seed, worker_count=d.worker_count,
      text_mode=d.text_mode, max_bad_fraction=d.max_bad_fraction,
      multicrop=augment.MultiCropConfig(
          global_size=d.global_size, local_size=d.local_size, num_local=d.num_local,
          global_scale=tuple(d.global_scale), local_scale=tuple(d.local_scale)),
      textcrop=captions.TextCropConfig(max_global_sentences=d.max_global_sentences))


def open_train_source(config: ml_collections.ConfigDict):
  spec = config.data.train
  if spec.startswith('synthetic'):
    return open_source(spec, **config.data.synthetic.to_dict())
  return open_source(spec)
