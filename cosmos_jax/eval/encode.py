"""Batched, jitted uni-modal encoders for evaluation (spec 5.1: the towers only).

Every call runs in fixed-size batches (the last one padded, the padding dropped after), so
each input shape compiles once. With a mesh, batches are split over ('data', 'fsdp') and the
features come back replicated, so every host can read them.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from cosmos_jax.data.augment import eval_transform
from cosmos_jax.models import CLIP, ModelConfig
from cosmos_jax.tokenizer import tokenize

BATCH_AXES = ('data', 'fsdp')
Template = str | Callable[[str], str]


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  # Every host holds the whole array; each device takes its slice (multi-host safe).
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def load_image(item: Any) -> Image.Image:
  """A path, a uint8 (H, W, 3) array or a PIL image -> an RGB PIL image."""
  if isinstance(item, Image.Image):
    return item.convert('RGB')
  if isinstance(item, np.ndarray):
    return Image.fromarray(item).convert('RGB')
  with Image.open(item) as im:
    return im.convert('RGB')


class ImageSource(Sequence):
  """Lazy eval-transformed images: item i is ``eval_transform(load_image(items[i]), size)``."""

  def __init__(self, items: Sequence[Any], size: int):
    self.items, self.size = items, size

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i):
    return eval_transform(load_image(self.items[i]), self.size)


def _host_batches(source: Any, batch_size: int, workers: int) -> Iterator[np.ndarray]:
  """Batches of ``source`` (an array, or a sequence loaded by a thread pool one batch ahead)."""
  n = len(source)
  starts = range(0, n, batch_size)
  if isinstance(source, np.ndarray):
    yield from (source[s:s + batch_size] for s in starts)
    return
  if workers <= 0:
    yield from (np.stack([source[i] for i in range(s, min(s + batch_size, n))]) for s in starts)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    def submit(s: int) -> list[concurrent.futures.Future]:
      return [pool.submit(source.__getitem__, i) for i in range(s, min(s + batch_size, n))]

    pending = submit(0) if n else []
    for s in starts:
      items = [f.result() for f in pending]
      if s + batch_size < n:
        pending = submit(s + batch_size)
      yield np.stack(items)


class Encoder:
  """L2-normalised float32 image / text features of a CLIP (or COSMOS) parameter tree.

  ``images(batch)`` takes (N, S, S, 3) float32 eval-transformed images or a lazy sequence of
  them (e.g. ``ImageSource``); ``texts(tokens)`` takes (N, context_length) token ids.
  ``dtype`` is the compute dtype of the matmuls; features are always float32.
  """

  def __init__(self, config: ModelConfig, params: Any, *, dtype: Any = jnp.float32,
               batch_size: int = 256, mesh: Optional[Mesh] = None, progress: bool = True,
               workers: int = 8):
    if isinstance(params, dict) and set(params) == {'params'}:
      params = params['params']
    self.config, self.dtype, self.mesh = config, dtype, mesh
    self.progress, self.workers = progress, workers
    model = CLIP(config, dtype=dtype)
    image_fn = lambda p, x: model.apply({'params': p}, x, method=CLIP.encode_image)[0]
    text_fn = lambda p, t: model.apply({'params': p}, t, method=CLIP.encode_text)[0]
    if mesh is None:
      self.batch_size = batch_size
      self._batch_sharding = None
      self.params = jax.device_put(params)
      jit = jax.jit
    else:
      axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
      dp = math.prod(mesh.shape[a] for a in axes)
      self.batch_size = -(-batch_size // dp) * dp
      self._batch_sharding = NamedSharding(mesh, P(axes or None))
      replicated = NamedSharding(mesh, P())
      self.params = jax.tree.map(lambda x: self._on_mesh(x, replicated), params)
      jit = lambda f: jax.jit(f, out_shardings=replicated)
    self._image_fn, self._text_fn = jit(image_fn), jit(text_fn)

  def _on_mesh(self, x: Any, replicated: NamedSharding) -> jax.Array:
    # Parameters already laid out on this mesh (e.g. FSDP-sharded) stay as they are.
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and \
        x.sharding.mesh == self.mesh:
      return x
    return _put(x, replicated)

  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  @property
  def context_length(self) -> int:
    return self.config.text.context_length

  def _run(self, fn, source: Any, dtype: Any, desc: str) -> np.ndarray:
    n, bs = len(source), self.batch_size
    out, prev = [], None
    bar = tqdm(total=n, desc=desc, disable=not self.progress, leave=False)
    for batch in _host_batches(source, bs, self.workers):
      m = len(batch)
      batch = np.asarray(batch, dtype)
      if m < bs:
        batch = np.concatenate([batch, np.zeros((bs - m,) + batch.shape[1:], dtype)])
      x = _put(batch, self._batch_sharding) if self._batch_sharding else batch
      y = fn(self.params, x)  # dispatched asynchronously; the previous batch is read meanwhile
      if prev is not None:
        out.append(np.asarray(prev[0])[:prev[1]])
      prev = (y, m)
      bar.update(m)
    if prev is not None:
      out.append(np.asarray(prev[0])[:prev[1]])
    bar.close()
    if not out:
      return np.zeros((0, self.config.embed_dim), np.float32)
    return np.concatenate(out)

  def images(self, batch: Any) -> np.ndarray:
    """(N, S, S, 3) eval-transformed images (array or lazy sequence) -> (N, E) features."""
    if len(batch) and np.shape(batch[0]) != (self.image_size, self.image_size, 3):
      raise ValueError(f'images must be ({self.image_size}, {self.image_size}, 3) each, got '
                       f'{np.shape(batch[0])}')
    return self._run(self._image_fn, batch, np.float32, 'images')

  def texts(self, tokens: np.ndarray) -> np.ndarray:
    """(N, context_length) token ids -> (N, E) features."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
      raise ValueError(f'tokens must be (N, {self.context_length}), got {tokens.shape}')
    return self._run(self._text_fn, tokens, np.int32, 'texts')

  def strings(self, texts: Sequence[str]) -> np.ndarray:
    """Tokenises with the CLIP BPE and encodes."""
    return self.texts(tokenize(list(texts), context_length=self.context_length))

  def image_files(self, items: Sequence[Any]) -> np.ndarray:
    """Paths / uint8 arrays / PIL images -> features, through the eval transform (spec 5.1)."""
    return self.images(ImageSource(items, self.image_size))

  def class_embeddings(self, class_names: Sequence[str],
                       templates: Sequence[Template]) -> np.ndarray:
    """(C, E) zero-shot weights: normalised mean of the normalised template embeddings (5.3)."""
    if not class_names or not templates:
      raise ValueError('class_embeddings needs at least one class name and one template')
    fill = lambda t, c: t.format(c) if isinstance(t, str) else t(c)
    prompts = [fill(t, c) for c in class_names for t in templates]
    feats = self.strings(prompts).reshape(len(class_names), len(templates), -1)
    return l2_normalize(feats.mean(axis=1)).astype(np.float32)
