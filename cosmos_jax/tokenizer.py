"""CLIP byte-level BPE tokenizer without torch.

Gives the same ids as `open_clip.tokenize` (OpenAI's `SimpleTokenizer` with
the default 'lower' cleaning), but the BPE itself runs in the HF `tokenizers`
library, built offline from the vendored CLIP merges file.

Pipeline of one text:
  1. clean (in Python, like CLIP): ftfy.fix_text, html.unescape twice, strip,
     collapse whitespace, lowercase;
  2. split with CLIP's regex, keeping only the matches;
  3. map every UTF-8 byte to a printable char (GPT-2 byte-level alphabet);
  4. BPE per word, the last symbol of a word carrying the suffix '</w>'.
`Tokenizer.__call__` adds SOT/EOT, zero-pads and truncates to the context.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import os
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers

VOCAB_SIZE = 49408
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
CONTEXT_LENGTH = 77

SOT_TOKEN = '<start_of_text>'
EOT_TOKEN = '<end_of_text>'
VOCAB_FILENAME = 'bpe_simple_vocab_16e6.txt.gz'

_WORD_SUFFIX = '</w>'
# CLIP uses the first 49152 - 256 - 2 merges of the file (line 0 is a header).
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
# CLIP's word pattern without its leading special-token alternatives (see
# `_encode_with_specials`), adapted to Oniguruma so that it splits like CLIP's
# `regex.compile(..., IGNORECASE)` on lowercased text:
# - contractions match case-insensitively, so "'" + U+017F (long s) is one
#   piece;
# - U+0345 (combining ypogegrammeni) matches no alternative in CLIP (its case
#   fold is a letter, so the ignore-case negated class rejects it), hence it is
#   dropped like whitespace. Oniguruma would otherwise keep it.
_WORD_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]"
                 r"|[^\s\p{L}\p{N}\x{345}]+")
_SPECIAL_PATTERN = f'{SOT_TOKEN}|{EOT_TOKEN}'
# Every text that CLIP's pattern can match as a special token contains this.
_SPECIAL_HINT = '_of_text>'


@functools.cache
def _byte_alphabet() -> tuple[tuple[int, str], ...]:
  """(byte, char) pairs of the GPT-2/CLIP byte-level alphabet, in vocab order.

  Printable Latin-1 bytes stand for themselves and come first; the other 68
  (controls, space, NBSP, soft hyphen, ...) follow in byte order as
  chr(256), chr(257), ... so that every token is printable.
  """
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  others = sorted(set(range(256)) - set(printable))
  return (tuple((b, chr(b)) for b in printable)
          + tuple((b, chr(256 + k)) for k, b in enumerate(others)))


def _read_merges(vocab_path: str | os.PathLike[str] | None) -> list[str]:
  if vocab_path is None:
    res = importlib.resources.files('cosmos_jax') / 'assets' / VOCAB_FILENAME
    raw = res.read_bytes()
  else:
    with open(vocab_path, 'rb') as f:
      raw = f.read()
  if raw[:2] == b'\x1f\x8b':
    raw = gzip.decompress(raw)
  lines = raw.decode('utf-8').split('\n')
  merges = lines[1:_NUM_MERGES + 1]
  if len(merges) != _NUM_MERGES:
    raise ValueError(f'{vocab_path or VOCAB_FILENAME}: expected {_NUM_MERGES} '
                     f'merges, found {len(merges)}.')
  return merges


def clean_text(text: str) -> str:
  """CLIP's 'lower' text cleaning (what open_clip applies before BPE)."""
  text = ftfy.fix_text(text)
  # Twice, because captions scraped from the web are often double-escaped.
  text = html.unescape(html.unescape(text)).strip()
  return ' '.join(text.split()).lower()


def _check_context_length(context_length: int) -> int:
  if (isinstance(context_length, bool)
      or not isinstance(context_length, (int, np.integer))):
    raise TypeError('context_length must be an int, got '
                    f'{type(context_length).__name__}.')
  if context_length < 2:
    raise ValueError('context_length must be >= 2 (room for SOT and EOT), got '
                     f'{context_length}.')
  return int(context_length)


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
  if isinstance(texts, str):
    return [texts]
  if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
    raise TypeError('texts must be a str or a sequence of str, got '
                    f'{type(texts).__name__}.')
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f'texts[{i}] must be a str, got {type(t).__name__}.')
  return texts


class Tokenizer:
  """CLIP BPE tokenizer; `__call__` matches `open_clip.tokenize` exactly."""

  def __init__(self, context_length: int = CONTEXT_LENGTH,
               vocab_path: str | os.PathLike[str] | None = None):
    self.context_length = _check_context_length(context_length)
    merges = _read_merges(vocab_path)
    alphabet = [c for _, c in _byte_alphabet()]
    tokens = (alphabet + [c + _WORD_SUFFIX for c in alphabet]
              + [m.replace(' ', '') for m in merges] + [SOT_TOKEN, EOT_TOKEN])
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    self._id_to_token = tokens
    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(' ')) for m in merges],
        continuing_subword_prefix='',
        end_of_word_suffix=_WORD_SUFFIX)
    hf = tokenizers.Tokenizer(model)
    # No HF normalizer: cleaning happens in Python (`clean_text`) so that
    # whitespace and lowercasing follow Python's str rules, as in CLIP.
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_WORD_PATTERN),
                             behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    self._hf = hf
    # For the rare texts that spell out a special token: CLIP's full pattern
    # (special tokens first, ignoring case like CLIP), and a second tokenizer
    # that BPEs each given piece as one word.
    self._split_with_specials = pre_tokenizers.Split(
        tokenizers.Regex(f'(?i:{_SPECIAL_PATTERN})|{_WORD_PATTERN}'),
        behavior='removed', invert=True)
    self._hf_words = tokenizers.Tokenizer(model)
    self._hf_words.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False)
    self._byte_of_char = {c: b for b, c in _byte_alphabet()}

  @property
  def vocab_size(self) -> int:
    return len(self._id_to_token)

  def _encode_cleaned(self, cleaned: list[str]) -> list[list[int]]:
    encodings = self._hf.encode_batch(cleaned, add_special_tokens=False)
    out = [e.ids for e in encodings]
    for i, text in enumerate(cleaned):
      if _SPECIAL_HINT in text:
        out[i] = self._encode_with_specials(text)
    return out

  def _encode_with_specials(self, text: str) -> list[int]:
    """Slow path for texts in which CLIP's pattern may find a special token.

    As in CLIP, only an exact special token maps to its id; a case variant
    such as '<\u017ftart_of_text>' is still one piece, BPE'd as a plain word.
    """
    specials = {SOT_TOKEN: SOT_TOKEN_ID, EOT_TOKEN: EOT_TOKEN_ID}
    pieces = [p for p, _ in self._split_with_specials.pre_tokenize_str(text)]
    encodings = self._hf_words.encode_batch(
        [[p] for p in pieces], is_pretokenized=True, add_special_tokens=False)
    ids = []
    for piece, encoding in zip(pieces, encodings):
      ids += [specials[piece]] if piece in specials else encoding.ids
    return ids

  def encode(self, text: str) -> list[int]:
    """BPE ids of the cleaned `text`, without SOT/EOT."""
    if not isinstance(text, str):
      raise TypeError(f'text must be a str, got {type(text).__name__}.')
    return self._encode_cleaned([clean_text(text)])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` for many texts at once (BPE runs in parallel)."""
    return self._encode_cleaned([clean_text(t) for t in _as_text_list(texts)])

  def decode(self, ids: Iterable[int]) -> str:
    """Best-effort inverse of `encode`; drops SOT, EOT and padding.

    Accepts either bare BPE ids or a row of `__call__`. Text after the first
    EOT is padding. Trailing zeros are padding too: id 0 ('!' without '</w>')
    can never end a word.
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if EOT_TOKEN_ID in ids:
      ids = ids[:ids.index(EOT_TOKEN_ID)]
    while ids and ids[-1] == 0:
      ids.pop()
    out = bytearray()
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f'Token id {i} is outside [0, {self.vocab_size}).')
      if i in (SOT_TOKEN_ID, EOT_TOKEN_ID):
        continue
      token = self._id_to_token[i]
      end_of_word = token.endswith(_WORD_SUFFIX)
      if end_of_word:
        token = token[:-len(_WORD_SUFFIX)]
      out += bytes(self._byte_of_char[c] for c in token)
      if end_of_word:
        out += b' '
    return out.decode('utf-8', errors='replace').strip()

  def __call__(self, texts: str | Sequence[str],
               context_length: int | None = None) -> np.ndarray:
    """Token ids, int32 of shape (N, context_length), like open_clip.tokenize.

    Each row is [SOT] + BPE + [EOT], zero padded. Longer rows are cut to
    `context_length` with the last token replaced by EOT.
    """
    if context_length is None:
      context_length = self.context_length
    context_length = _check_context_length(context_length)
    texts = _as_text_list(texts)
    result = np.zeros((len(texts), context_length), dtype=np.int32)
    for row, ids in zip(result, self.encode_batch(texts)):
      ids = [SOT_TOKEN_ID, *ids[:context_length - 2], EOT_TOKEN_ID]
      row[:len(ids)] = ids
    return result


@functools.cache
def default_tokenizer() -> Tokenizer:
  """The shared Tokenizer with the vendored vocab (built on first use)."""
  return Tokenizer()


def tokenize(texts: str | Sequence[str],
             context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """`open_clip.tokenize` without torch: int32 ids of shape (N, context)."""
  return default_tokenizer()(texts, context_length)
