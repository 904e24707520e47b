"""Input data: sources, augmentation and pipelines."""
