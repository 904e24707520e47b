"""Caption templates of the synthetic shapes dataset, in the DreamLIP json layout.

`scene_captions` turns a structured scene (see `synthetic.py`) into the seven
DreamLIP fields, each a list of sentences without dots, so that the captions go
through the same text cropping as real data. Every long list names every
object (colour, size, shape, position), pairwise relations and the background;
short lists are one or two sentences; `raw_caption` is one sentence naming
each object's colour, shape and position and the background (the one to use
for retrieval: it separates the near-duplicates of the val split).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CAPTION_FIELDS = ('raw_caption', 'shortIB_captions', 'longIB_captions',
                  'shortSV_captions', 'longSV_captions', 'shortLLA_captions',
                  'longLLA_captions')

SIZE_WORDS = {
    'small': ('small', 'tiny', 'little'),
    'medium': ('medium-sized', 'mid-sized', 'medium'),
    'large': ('large', 'big', 'huge'),
}
# kind -> (adjective, noun phrase); captions always use the adjective.
BACKGROUND_WORDS = {
    'stripes': ('striped', 'stripes'),
    'checkerboard': ('checkered', 'a checkerboard pattern'),
    'noise': ('noisy', 'speckled noise'),
    'gradient': ('gradient', 'a smooth gradient'),
    'dots': ('dotted', 'polka dots'),
}
_NUMBERS = ('no', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight',
            'nine')

_INTRO = {
    'IB': ('The image shows {count} geometric {shapes} on a {bg} background',
           'This picture contains {count} simple {shapes} drawn on a {bg} '
           'background',
           'There {are} {count} colored {shapes} in this image'),
    'SV': ('In this image, {count} {shapes} {are} arranged on a {bg} background',
           'The image presents a simple composition of {count} flat {shapes}',
           'This is a synthetic picture with {count} {shapes} over a {bg} '
           'backdrop'),
    'LLA': ('The image features {count} {shapes}',
            'We can see {count} {shapes} placed on a {bg} background',
            'The scene is made of {count} plain {shapes}'),
}
_OBJECT = {
    'IB': ('There is {a_obj} in the {pos} of the image',
           '{A_obj} is located in the {pos}',
           'In the {pos} there is {a_obj}'),
    'SV': ('{A_col_shape} of {size_name} size sits in the {pos} part of the image',
           'In the {pos} area, {a_obj} can be seen',
           'One of the shapes is {a_obj}, placed in the {pos}'),
    'LLA': ('{A_obj} appears in the {pos}',
            'A {size} shape, {a_col_shape}, is positioned in the {pos}',
            'At the {pos} of the picture we find {a_obj}'),
}
_RELATION = ('The {c1} {s1} is {rel} the {c2} {s2}',
             'The {c1} {s1} lies {rel} the {c2} {s2}',
             'Relative to the {c2} {s2}, the {c1} {s1} is {rel} it')
_BACKGROUND = ('The background is {col} with {noun}',
               'Behind the shapes there is a {col} {adj} backdrop',
               'The shapes are set against a {adj} {col} background, showing {noun}')


def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _cap(text: str) -> str:
  return text[0].upper() + text[1:]


def _join(items: Sequence[str]) -> str:
  if len(items) == 1:
    return items[0]
  return ', '.join(items[:-1]) + ' and ' + items[-1]


def _relation(a: dict[str, Any], b: dict[str, Any]) -> str:
  """Spatial relation of a to b from their centres (the larger offset wins)."""
  dx, dy = a['cx'] - b['cx'], a['cy'] - b['cy']
  if abs(dx) >= abs(dy):
    return 'to the left of' if dx < 0 else 'to the right of'
  return 'above' if dy < 0 else 'below'


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _object_words(o: dict[str, Any], rng: np.random.Generator) -> dict[str, str]:
  size = _pick(rng, SIZE_WORDS[o['size']])
  obj = f"{size} {o['colour']} {o['shape']}"
  col_shape = f"{o['colour']} {o['shape']}"
  return dict(size=size, size_name=o['size'], pos=o['position'],
              a_obj=f'{_article(obj)} {obj}', A_obj=_cap(f'{_article(obj)} {obj}'),
              a_col_shape=f'{_article(col_shape)} {col_shape}',
              A_col_shape=_cap(f'{_article(col_shape)} {col_shape}'))


def _long(style: str, objects: list[dict[str, Any]], bg_words: dict[str, str],
          rng: np.random.Generator) -> list[str]:
  n = len(objects)
  count = dict(count=_NUMBERS[n] if n < len(_NUMBERS) else str(n),
               shapes='shapes' if n > 1 else 'shape', are='are' if n > 1 else 'is')
  out = [_pick(rng, _INTRO[style]).format(bg=bg_words['bg'], **count)]
  for i in rng.permutation(n):
    out.append(_pick(rng, _OBJECT[style]).format(**_object_words(objects[i], rng)))
  pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
  for p in rng.permutation(len(pairs)):
    a, b = (objects[k] for k in pairs[p])
    if rng.random() < 0.5:
      a, b = b, a
    out.append(_pick(rng, _RELATION).format(
        c1=a['colour'], s1=a['shape'], c2=b['colour'], s2=b['shape'],
        rel=_relation(a, b)))
  out.append(_pick(rng, _BACKGROUND).format(**bg_words))
  return [_cap(s) for s in out]


def scene_captions(scene: dict[str, Any],
                   rng: np.random.Generator) -> dict[str, list[str]]:
  """The seven DreamLIP caption fields of a scene; each a list of sentences."""
  objects, bg = scene['objects'], scene['background']
  adj, noun = BACKGROUND_WORDS[bg['kind']]
  bg_words = dict(col=bg['colour'], adj=adj, noun=noun,
                  bg=f"{bg['colour']} {adj}")
  plain = [f"{_article(o['colour'])} {o['colour']} {o['shape']}" for o in objects]
  sized = []
  for o in objects:
    w = f"{_pick(rng, SIZE_WORDS[o['size']])} {o['colour']} {o['shape']}"
    sized.append(f'{_article(w)} {w}')
  placed = [f"{p} in the {o['position']}" for p, o in zip(plain, objects)]
  bg_phrase = f"on {_article(bg['colour'])} {bg['colour']} {adj} background"
  n = len(objects)
  what = f"{_NUMBERS[n] if n < len(_NUMBERS) else n} shape{'s' if n > 1 else ''}"
  return {
      'raw_caption': [_cap(f'{_join(placed)} {bg_phrase}')],
      'shortIB_captions': [_cap(f'{_join(sized)} {bg_phrase}')],
      'shortSV_captions': [_cap(f'The image shows {what}: {_join(plain)}'),
                           f"The background is {bg['colour']} with {noun}"],
      'shortLLA_captions': [_cap(f'{_join(placed)}, drawn {bg_phrase}')],
      'longIB_captions': _long('IB', objects, bg_words, rng),
      'longSV_captions': _long('SV', objects, bg_words, rng),
      'longLLA_captions': _long('LLA', objects, bg_words, rng),
  }
