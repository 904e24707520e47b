"""Embedded synthetic dataset: coloured shapes on textured backgrounds.

Each sample is generated on the fly from (seed, split, index): 1-3 flat shapes
(8 classes, 8 saturated colours, 3 sizes, one per cell of a 3x3 grid, drawn
largest first so later objects occlude earlier ones) on one of 5 two-tone
textures in one of 6 muted colours, with a per-pixel class mask and captions in
the DreamLIP json layout (`synthetic_text.py`). Nothing is downloaded.

Near-duplicate groups (val split only): val samples come in consecutive groups
of `group_size` (default 4). Group g = index // group_size shares one base
scene, background texture included; member 0 is the base and members 1.. each
give ONE object of it another value of ONE attribute (colour, shape or grid
position; the object and attribute are drawn per group). So any two members of
a group differ in exactly that attribute of that object, and image-text
retrieval within a group needs the fine detail. `meta['group']` and
`meta['varied']` record this.

`meta['objects']` (draw order) and `meta['background']` are the structured
scene; `render_scene` turns them back into pixels at any resolution.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import tarfile
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cosmos_jax.data.synthetic_text import BACKGROUND_WORDS, scene_captions

Colour = tuple[int, int, int]

SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'ring', 'hexagon',
          'diamond')
COLOURS: tuple[tuple[str, Colour], ...] = (
    ('red', (230, 25, 25)), ('green', (30, 190, 45)), ('blue', (40, 80, 250)),
    ('yellow', (250, 225, 25)), ('orange', (250, 135, 0)),
    ('purple', (150, 45, 220)), ('pink', (250, 110, 200)),
    ('white', (245, 245, 245)))
BACKGROUND_COLOURS: tuple[tuple[str, Colour], ...] = (
    ('gray', (120, 120, 120)), ('brown', (115, 75, 40)), ('navy', (30, 40, 105)),
    ('olive', (100, 100, 35)), ('teal', (25, 100, 100)),
    ('maroon', (105, 30, 45)))
BACKGROUNDS = ('stripes', 'checkerboard', 'noise', 'gradient', 'dots')
# Radius as a fraction of the image side.
SIZES: tuple[tuple[str, tuple[float, float]], ...] = (
    ('small', (0.05, 0.08)), ('medium', (0.10, 0.14)), ('large', (0.17, 0.22)))
VARIED_ATTRIBUTES = ('colour', 'shape', 'position')

_ROWS = ('top', 'center', 'bottom')
_COLS = ('left', 'center', 'right')
_SPLITS = {'train': 0, 'val': 1}
_CELL_MARGIN = 0.06      # keeps centres away from cell borders: unambiguous words
_MIN_VISIBLE = 0.35      # every object keeps this fraction of its pixels
_CHECK_SIZE = 64         # visibility is checked here: scenes don't depend on size
_CAPTION_STREAM = 7


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Size, length, seed and vocabularies of the synthetic dataset."""
  image_size: int = 224
  num_train: int = 10_000
  num_val: int = 1_000
  seed: int = 0
  min_objects: int = 1
  max_objects: int = 3
  group_size: int = 4
  shapes: tuple[str, ...] = SHAPES
  colours: tuple[tuple[str, Colour], ...] = COLOURS
  background_colours: tuple[tuple[str, Colour], ...] = BACKGROUND_COLOURS
  backgrounds: tuple[str, ...] = BACKGROUNDS
  sizes: tuple[tuple[str, tuple[float, float]], ...] = SIZES

  def __post_init__(self):
    if not set(self.shapes) <= set(SHAPES):
      raise ValueError(f'unknown shapes {set(self.shapes) - set(SHAPES)}')
    if not set(self.backgrounds) <= set(BACKGROUNDS):
      raise ValueError(f'unknown backgrounds {self.backgrounds}')
    if not 1 <= self.min_objects <= self.max_objects <= 9:
      raise ValueError('need 1 <= min_objects <= max_objects <= 9')
    if self.max_objects + self.group_size - 1 > len(self.colours):
      raise ValueError('too few colours for distinct colours in a val group')
    if not 2 <= self.group_size <= min(len(self.shapes), 10 - self.max_objects):
      raise ValueError(f'group_size {self.group_size} does not fit the vocabulary')


def _as_tuples(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuples(v) for v in value)
  return value


def config_from_fields(fields: dict[str, Any]) -> SyntheticConfig:
  """A SyntheticConfig from a run config's ``data.synthetic`` fields (lists become tuples).

  Training and every evaluation of a run build their generator here, so that a field set in
  the run config (``max_objects``, ``colours``, ...) reaches the validation split too.
  """
  unknown = set(fields) - {f.name for f in dataclasses.fields(SyntheticConfig)}
  if unknown:
    raise ValueError(f'unknown data.synthetic fields {sorted(unknown)}')
  return SyntheticConfig(**{k: _as_tuples(v) for k, v in fields.items()})


def position_name(cx: float, cy: float) -> str:
  """Word for a centre in [0, 1]^2 on a 3x3 grid, e.g. 'top left', 'center'."""
  row, col = min(int(cy * 3), 2), min(int(cx * 3), 2)
  return 'center' if row == col == 1 else f'{_ROWS[row]} {_COLS[col]}'


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  def ring(n, radii, start):
    return [(cx + radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / n),
             cy + radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)]
  if shape == 'triangle':
    return ring(3, [r], -math.pi / 2)
  if shape == 'star':
    return ring(10, [r, 0.42 * r], -math.pi / 2)
  if shape == 'hexagon':
    return ring(6, [r], 0.0)
  if shape == 'diamond':
    return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
  if shape == 'cross':
    w = 0.32 * r
    pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w),
           (-r, -w), (-r, w), (-w, w), (-w, r)]
    return [(cx + x, cy + y) for x, y in pts]
  raise ValueError(shape)


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
  """Boolean (size, size) mask of one shape, centre and radius in pixels."""
  im = Image.new('L', (size, size), 0)
  draw = ImageDraw.Draw(im)
  if shape in ('circle', 'ring'):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    if shape == 'ring':
      draw.ellipse([cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r], fill=0)
  elif shape == 'square':
    s = 0.85 * r
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=1)
  else:
    draw.polygon(_polygon(shape, cx, cy, r), fill=1)
  return np.asarray(im, dtype=bool)


def object_masks(objects: list[dict[str, Any]], size: int) -> np.ndarray:
  """Unoccluded boolean masks (n, size, size) of the objects."""
  out = np.zeros((len(objects), size, size), bool)
  for i, o in enumerate(objects):
    # Pixel (x, y) covers [x, x+1): the continuous centre maps to cx*size - 0.5.
    out[i] = _shape_mask(o['shape'], o['cx'] * size - 0.5, o['cy'] * size - 0.5,
                         o['r'] * size, size)
  return out


def visible_masks(masks: np.ndarray) -> np.ndarray:
  """Each object's pixels not covered by a later object."""
  vis = masks.copy()
  covered = np.zeros(masks.shape[1:], bool)
  for i in range(len(masks) - 1, -1, -1):
    vis[i] &= ~covered
    covered |= masks[i]
  return vis


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  return c[:, None], c[None, :]


def _background(bg: dict[str, Any], size: int, palette: dict[str, Colour]) -> np.ndarray:
  """Two-tone texture (size, size, 3) uint8: t in [0, 1] mixes base and dark."""
  yy, xx = _grid(size)
  p, kind = bg['period'], bg['kind']
  if kind == 'stripes':
    o = bg['orientation']
    coord = yy if o == 0 else xx if o == 1 else (xx + yy) / math.sqrt(2)
    t = np.floor(coord / (p / 2)) % 2
  elif kind == 'checkerboard':
    t = (np.floor(xx / p) + np.floor(yy / p)) % 2
  elif kind == 'dots':
    t = ((xx % p - p / 2) ** 2 + (yy % p - p / 2) ** 2 < (0.25 * p) ** 2) * 1.0
  elif kind == 'gradient':
    a = bg['angle']
    t = xx * math.cos(a) + yy * math.sin(a)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  elif kind == 'noise':
    k = max(2, round(1 / p))
    cells = np.random.default_rng(bg['noise_seed']).random((k, k), np.float32)
    idx = np.arange(size) * k // size
    t = cells[idx][:, idx]
  else:
    raise ValueError(kind)
  base = np.asarray(palette[bg['colour']], np.float32)
  t = np.broadcast_to(np.asarray(t, np.float32), (size, size))
  img = base - 0.5 * base * t[..., None]
  return np.round(img).astype(np.uint8)


def render_scene(scene: dict[str, Any], config: SyntheticConfig,
                 size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(image uint8 HxWx3, class mask uint8 HxW, visible masks bool n x H x W)."""
  size = size or config.image_size
  image = _background(scene['background'], size, dict(config.background_colours))
  mask = np.zeros((size, size), np.uint8)
  colours = dict(config.colours)
  vis = visible_masks(object_masks(scene['objects'], size))
  for o, m in zip(scene['objects'], vis):
    image[m] = colours[o['colour']]
    mask[m] = config.shapes.index(o['shape']) + 1
  return image, mask, vis


def _visible_ok(objects: list[dict[str, Any]]) -> bool:
  masks = object_masks(objects, _CHECK_SIZE)
  area = masks.sum((1, 2))
  visible = visible_masks(masks).sum((1, 2))
  return bool(np.all(visible >= _MIN_VISIBLE * np.maximum(area, 1)))


def _place(rng: np.random.Generator, cell: int, r: float) -> tuple[float, float]:
  """Centre inside the cell's interior, pulled in so the shape stays mostly inside."""
  def coord(i):
    lo = max(i / 3 + _CELL_MARGIN, 0.7 * r)
    hi = min((i + 1) / 3 - _CELL_MARGIN, 1 - 0.7 * r)
    return float(rng.uniform(lo, hi))
  cy, cx = coord(cell // 3), coord(cell % 3)
  return cx, cy


def _make_object(shape: str, colour: str, size: str, cell: int, r: float,
                 rng: np.random.Generator) -> dict[str, Any]:
  cx, cy = _place(rng, cell, r)
  return dict(shape=shape, colour=colour, size=size, position=position_name(cx, cy),
              cell=cell, cx=cx, cy=cy, r=r)


def sample_scene(rng: np.random.Generator, config: SyntheticConfig) -> dict[str, Any]:
  """A random scene: objects in distinct cells with distinct colours, largest first."""
  colour_names = [c for c, _ in config.colours]
  for _ in range(100):
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = rng.choice(9, n, replace=False)
    colours = rng.choice(len(colour_names), n, replace=False)
    objects = []
    for cell, c in zip(cells, colours):
      size, (lo, hi) = config.sizes[int(rng.integers(len(config.sizes)))]
      shape = config.shapes[int(rng.integers(len(config.shapes)))]
      objects.append(_make_object(shape, colour_names[c], size, int(cell),
                                  float(rng.uniform(lo, hi)), rng))
    objects.sort(key=lambda o: -o['r'])
    if _visible_ok(objects):
      break
  kind = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
  colour = config.background_colours[int(rng.integers(len(config.background_colours)))]
  background = dict(
      kind=kind, colour=colour[0],
      period=float(rng.uniform(0.08, 0.2)), orientation=int(rng.integers(3)),
      angle=float(rng.uniform(0, 2 * math.pi)), noise_seed=int(rng.integers(2**31)))
  return dict(objects=objects, background=background)


def _variants(base: dict[str, Any], rng: np.random.Generator,
              config: SyntheticConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """`group_size - 1` scenes that each change one attribute of one base object."""
  objects = base['objects']
  k = int(rng.integers(len(objects)))
  first = int(rng.integers(len(VARIED_ATTRIBUTES)))
  for a in range(len(VARIED_ATTRIBUTES)):
    attr = VARIED_ATTRIBUTES[(first + a) % len(VARIED_ATTRIBUTES)]
    o = objects[k]
    if attr == 'colour':
      used = {p['colour'] for p in objects}
      options = [dict(o, colour=c) for c, _ in config.colours if c not in used]
    elif attr == 'shape':
      options = [dict(o, shape=s) for s in config.shapes if s != o['shape']]
    else:
      used = {p['cell'] for p in objects}
      options = [_make_object(o['shape'], o['colour'], o['size'], c, o['r'], rng)
                 for c in range(9) if c not in used]
    found = []
    for i in rng.permutation(len(options)):
      new = objects[:k] + [options[i]] + objects[k + 1:]
      if _visible_ok(new):
        found.append(dict(base, objects=new))
        if len(found) == config.group_size - 1:
          return dict(object=k, attribute=attr), found
  raise RuntimeError('no near-duplicate variants found')  # Not seen in practice.


class SyntheticDataset:
  """Random-access synthetic split; sample i is a pure function of (seed, split, i)."""

  def __init__(self, config: SyntheticConfig, split: str = 'train'):
    if split not in _SPLITS:
      raise ValueError(f'split must be one of {tuple(_SPLITS)}, got {split!r}')
    self.config, self.split = config, split
    self._sid = _SPLITS[split]

  def __len__(self) -> int:
    return self.config.num_train if self.split == 'train' else self.config.num_val

  def key(self, index: int) -> str:
    return f'{self.split}_{index:08d}'

  def scene(self, index: int) -> dict[str, Any]:
    """Structured scene of sample `index` (JSON-serialisable)."""
    cfg = self.config
    if self.split == 'train':
      return sample_scene(np.random.default_rng([cfg.seed, self._sid, index]), cfg)
    group, member = divmod(index, cfg.group_size)
    rng = np.random.default_rng([cfg.seed, self._sid, group])
    base = sample_scene(rng, cfg)
    varied, variants = _variants(base, rng, cfg)
    scene = base if member == 0 else variants[member - 1]
    return dict(scene, group=group, varied=varied)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(index)
    cfg = self.config
    scene = self.scene(index)
    stream = index if self.split == 'train' else index // cfg.group_size
    # Val groups share the caption templates: captions differ only in the varied words.
    rng = np.random.default_rng([cfg.seed, self._sid, stream, _CAPTION_STREAM])
    image, mask, vis = render_scene(scene, cfg)
    areas = vis.sum((1, 2))
    shape_ids = [cfg.shapes.index(o['shape']) for o in scene['objects']]
    meta = dict(scene_captions(scene, rng), **scene)
    return dict(key=self.key(index), image=image, meta=meta, mask=mask,
                label=shape_ids[int(np.argmax(areas))],
                labels=sorted({s for s, a in zip(shape_ids, areas) if a > 0}))

  def class_names(self) -> list[str]:
    """Shape names, index = label (for prompts like 'a photo of a {}')."""
    return list(self.config.shapes)

  def mask_class_names(self) -> list[str]:
    """Segmentation class lines: 0 = background, k = shape k - 1.

    The background line lists synonyms (each its own query, the max taken, as VOC21's line 0
    lists stuff words): the textures as the captions name them. Every caption says
    "background", so that word alone tells a model trained on them nothing about the pixels.
    """
    textures = [BACKGROUND_WORDS[b][1].removeprefix('a ') for b in self.config.backgrounds]
    return [', '.join(['background', *textures])] + list(self.config.shapes)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mode, info.mtime = len(data), 0o644, 0  # Reproducible bytes.
  tar.addfile(info, io.BytesIO(data))


def _encode(image: np.ndarray, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **kw)
  return buf.getvalue()


def write_tar_shards(dataset: SyntheticDataset, out_dir: str,
                     samples_per_shard: int = 1000, prefix: str | None = None,
                     jpeg_quality: int = 95) -> list[str]:
  """Writes webdataset shards `{prefix}-{i:04d}.tar` like img2dataset; returns their paths.

  Members per sample: `<key>.jpg` (RGB, quality 95, 4:4:4 chroma so small
  objects keep their colour), `<key>.json` (the meta
  fields plus `key`, `label`, `labels`) and `<key>.mask.png` (class mask, 8-bit).
  """
  prefix = prefix or f'synthetic-{dataset.split}'
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for s, start in enumerate(range(0, len(dataset), samples_per_shard)):
    path = os.path.join(out_dir, f'{prefix}-{s:04d}.tar')
    with tarfile.open(path + '.tmp', 'w') as tar:
      for i in range(start, min(start + samples_per_shard, len(dataset))):
        x = dataset[i]
        record = dict(x['meta'], key=x['key'], label=x['label'], labels=x['labels'])
        jpg = _encode(x['image'], 'JPEG', quality=jpeg_quality, subsampling=0)
        _add_member(tar, f"{x['key']}.jpg", jpg)
        _add_member(tar, f"{x['key']}.json", json.dumps(record).encode())
        _add_member(tar, f"{x['key']}.mask.png", _encode(x['mask'], 'PNG'))
    os.replace(path + '.tmp', path)
    paths.append(path)
  return paths


def shard_pattern(out_dir: str, num_shards: int, prefix: str) -> str:
  """Brace pattern of `write_tar_shards` output, e.g. 'dir/synthetic-train-{0000..0003}.tar'."""
  return os.path.join(out_dir, f'{prefix}-{{0000..{num_shards - 1:04d}}}.tar')
