"""Tests for cosmos_jax.tokenizer: exact parity with open_clip.tokenize."""

import gzip
import hashlib
import importlib.resources
import random
import subprocess
import sys

import numpy as np
import pytest

from cosmos_jax import tokenizer as tok_lib

SOT, EOT = tok_lib.SOT_TOKEN_ID, tok_lib.EOT_TOKEN_ID
VOCAB_SHA256 = (
    '924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a')

# Strings where a plain BPE would go wrong: the cleaning (ftfy, html, case,
# whitespace), CLIP's split regex, multi-byte UTF-8 and the special tokens.
EDGE_TEXTS = [
    # Accents, in both NFC and decomposed form.
    'café', 'naïve', 'Zürich', 'São Paulo', 'Straße', 'cafe\u0301',
    'Ångström ǅ İstanbul',
    # HTML entities, single and double escaped.
    '&amp;', '&lt;b&gt;bold&lt;/b&gt;', 'it&#39;s', '&quot;quoted&quot;',
    '&amp;amp; &amp;lt;tag&amp;gt;', '&amp;amp;amp;', 'caf&eacute; &nbsp;x',
    # ftfy unescapes entities itself, but not when the text has a '<'.
    '<b>&amp;amp;</b> x &amp;lt; y', 'AT&T and Q&A',
    # Emoji (with skin tone, ZWJ sequence, variation selector).
    '🙂👍🏽 so good', '🏳️‍🌈 flag', 'I ❤️ NY', '🐱🐶🦊',
    # CJK, Korean, Arabic, Hebrew, Hindi, Thai, Greek, Cyrillic.
    '一只猫的照片', '猫の写真です', '고양이 사진', 'صورة قطة جميلة', 'תמונה של חתול',
    'बिल्ली की तस्वीर', 'รูปแมว', 'φωτογραφία μιας γάτας', 'Фото кошки',
    # Mojibake that ftfy repairs.
    'cafÃ©', 'â€œquotedâ€\x9d', 'Ã¼ber', 'Iâ€™m here', 'doesnâ€™t',
    # Ligatures.
    'ﬁsh ﬂower ﬀ ﬃ', 'ﬆop',
    # Numbers and punctuation runs.
    '1234567890', '3.14159', '$1,000,000.00', '!!!???...', '---===+++',
    '(+1) 555-0100', '½ ² Ⅷ ٣', "rock'n'roll", "''''", '...a...',
    # Contractions, in any case.
    "don't won't they're we've i'm you'll he'd", "IT'S THEY'RE", "it'ſ",
    # URLs and addresses.
    'https://example.com/path/to?q=a+b&x=1#frag', 'www.Example.ORG',
    'someone@example.com', 'C:\\Users\\me\\file.txt',
    # Empty, whitespace-only, tabs and newlines, odd spaces, controls.
    '', ' ', '   ', '\t', '\n\n', '\t\n a\tb\nc\r\nd ', '\u3000wide\u3000space',
    'no\u00a0break', 'zero\u200bwidth', '\ufeffbom', 'a\x00b\x07c\x7f',
    'x\u0345y \u0345 !\u0345!',
    # Special tokens spelled out in the text.
    '<start_of_text>', 'a <end_of_text> b', '<START_OF_TEXT>x',
    '<<start_of_text>', '<\u017ftart_of_text>', '<start_of_text',
    # One very long word.
    'supercalifragilisticexpialidocious' * 12,
]


@pytest.fixture(scope='module')
def tok():
  return tok_lib.Tokenizer()


def _long_texts() -> list[str]:
  """Texts of several hundred words, far past 77 tokens."""
  from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
  rng = random.Random(0)
  words = [w for name in IMAGENET_CLASSNAMES for w in name.split()]
  words += ['Zürich', '猫', '🙂', '&amp;', "it's", '3.5', 'ﬁne', '...']
  texts = [' '.join(rng.choices(words, k=n)) for n in (150, 300, 600)]
  texts.append('word, ' * 400)
  texts.append('猫' * 300)
  texts.append(' '.join(EDGE_TEXTS) * 3)
  return texts


def _assert_same_rows(texts, ours, ref):
  assert ours.dtype == np.int32
  assert ours.shape == ref.shape
  bad = np.flatnonzero((ours != ref).any(axis=1))
  details = '\n'.join(f'{texts[i]!r}:\n  ours {ours[i].tolist()}\n'
                      f'  open_clip {ref[i].tolist()}' for i in bad[:5])
  assert bad.size == 0, f'{bad.size} of {len(texts)} rows differ:\n{details}'


# Parity with open_clip.


def test_matches_open_clip_on_imagenet_prompts(tok, torch_modules):
  _, open_clip = torch_modules
  from open_clip.zero_shot_metadata import (IMAGENET_CLASSNAMES,
                                            OPENAI_IMAGENET_TEMPLATES)
  templates = OPENAI_IMAGENET_TEMPLATES
  assert len(IMAGENET_CLASSNAMES) == 1000 and len(templates) == 80
  # Every class with 3 rotating templates, and all 80 for 40 classes.
  texts = [templates[(i + k) % 80](name)
           for i, name in enumerate(IMAGENET_CLASSNAMES) for k in (0, 27, 53)]
  texts += [t(name) for name in IMAGENET_CLASSNAMES[::25] for t in templates]
  ref = open_clip.tokenize(texts).numpy()
  _assert_same_rows(texts, tok(texts), ref)


def test_matches_open_clip_on_edge_cases(tok, torch_modules):
  _, open_clip = torch_modules
  texts = EDGE_TEXTS + _long_texts()
  _assert_same_rows(texts, tok(texts), open_clip.tokenize(texts).numpy())
  # The module-level function gives the same.
  _assert_same_rows(texts, tok_lib.tokenize(texts),
                    open_clip.tokenize(texts).numpy())


@pytest.mark.parametrize('context_length', [2, 5, 16, 100])
def test_matches_open_clip_other_context_lengths(tok, torch_modules,
                                                 context_length):
  _, open_clip = torch_modules
  texts = EDGE_TEXTS + _long_texts()
  ref = open_clip.tokenize(texts, context_length=context_length).numpy()
  _assert_same_rows(texts, tok(texts, context_length=context_length), ref)


def test_tokenizer_module_does_not_import_torch():
  code = ('import sys\n'
          'from cosmos_jax.tokenizer import tokenize\n'
          'assert tokenize("a cat")[0, 2] == 2368\n'
          'assert "torch" not in sys.modules, "torch imported"\n'
          'assert "open_clip" not in sys.modules, "open_clip imported"\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr


# Hand-worked checks (no open_clip).


def test_constants_and_vocab(tok):
  assert tok_lib.VOCAB_SIZE == tok.vocab_size == 49408
  assert (SOT, EOT) == (49406, 49407)
  assert tok_lib.CONTEXT_LENGTH == tok.context_length == 77


def test_vendored_vocab_file_is_clip_bpe():
  res = (importlib.resources.files('cosmos_jax') / 'assets'
         / tok_lib.VOCAB_FILENAME)
  raw = res.read_bytes()
  assert hashlib.sha256(raw).hexdigest() == VOCAB_SHA256
  lines = gzip.decompress(raw).decode('utf-8').split('\n')
  # Header line, then merges; CLIP uses the first 48894.
  assert lines[1] == 'i n' and len(lines) > 48895


def test_single_characters_map_to_byte_ids(tok):
  # A one-char word is its byte-level char + '</w>': id 256 + rank of the
  # byte among the printable ones ('!' is rank 0).
  for c in '!09AZaz~':
    assert tok.encode(c) == [256 + ord(c.lower()) - ord('!')], c


def test_known_ids(tok):
  row = tok('a photo of a cat.')[0]
  expected = [SOT, 320, 1125, 539, 320, 2368, 269, EOT]
  np.testing.assert_array_equal(row[:8], expected)
  assert not row[8:].any()
  assert tok.encode("It's") == [585, 568]  # 'it</w>', "'s</w>"


def test_shape_dtype_and_layout(tok):
  text = 'a photo of a small brown dog playing in the park.'
  out = tok(text)
  assert out.shape == (1, 77) and out.dtype == np.int32
  content = tok.encode(text)
  n = len(content)
  row = out[0]
  assert row[0] == SOT
  np.testing.assert_array_equal(row[1:n + 1], content)
  assert row[n + 1] == EOT
  assert not row[n + 2:].any()
  assert SOT not in content and EOT not in content
  batch = tok([text, 'cat', text])
  assert batch.shape == (3, 77)
  np.testing.assert_array_equal(batch[0], row)
  np.testing.assert_array_equal(batch[2], row)


def test_cleaning(tok):
  assert tok.encode('  A\tDOG\n ') == tok.encode('a dog')
  assert tok.encode('&amp;amp;') == tok.encode('&')
  assert tok.encode('caf&eacute;') == tok.encode('CAFE\u0301')
  assert tok.encode('cafÃ©') == tok.encode('café')
  assert tok.encode('ﬁsh') == tok.encode('fish')


@pytest.mark.parametrize('text', ['', ' ', '   ', '\t\n', '\u3000'])
def test_empty_and_whitespace(tok, text):
  assert tok.encode(text) == []
  row = tok(text)[0]
  assert row[0] == SOT and row[1] == EOT and not row[2:].any()


def test_truncation(tok):
  # 'a' is one token ('a</w>' = 320), so the lengths are exact.
  fits = tok('a ' * 75)[0]
  np.testing.assert_array_equal(fits, [SOT] + [320] * 75 + [EOT])
  cut = tok('a ' * 76)[0]
  np.testing.assert_array_equal(cut, fits)
  text = ' '.join(f'{w} number{i}' for i, w in enumerate(['zebra', 'photo',
                                                          'red'] * 40))
  content = tok.encode(text)
  assert len(content) > 200
  row = tok(text)[0]
  assert row[0] == SOT and row[76] == EOT
  np.testing.assert_array_equal(row[1:76], content[:75])


def test_custom_context_length(tok):
  short = tok_lib.Tokenizer(context_length=16)
  out = short(['a dog', 'a ' * 30])
  assert out.shape == (2, 16) and out.dtype == np.int32
  np.testing.assert_array_equal(out[1], [SOT] + [320] * 14 + [EOT])
  np.testing.assert_array_equal(out[0], tok('a dog')[0, :16])
  # A per-call length overrides the instance one, in both directions.
  assert short('a dog', context_length=40).shape == (1, 40)
  np.testing.assert_array_equal(tok('a dog cat', context_length=2),
                                [[SOT, EOT]])
  assert tok_lib.tokenize(['x', 'y'], context_length=8).shape == (2, 8)


def test_default_tokenizer_is_cached(tok):
  assert tok_lib.default_tokenizer() is tok_lib.default_tokenizer()
  texts = ['a cat', 'Zürich', '']
  np.testing.assert_array_equal(tok_lib.tokenize(texts), tok(texts))


def test_batch_equals_single(tok):
  batch = tok(EDGE_TEXTS)
  singles = np.concatenate([tok(t) for t in EDGE_TEXTS])
  np.testing.assert_array_equal(batch, singles)


def test_decode_round_trip(tok):
  text = 'a photo of a small brown dog playing in the park'
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok(text)[0]) == text
  assert tok.decode(tok(text, context_length=6)[0]) == 'a photo of a'
  assert tok.decode(tok.encode('Zürich 猫 🙂')) == 'zürich 猫 🙂'
  assert tok.decode(tok('')[0]) == ''
  with pytest.raises(ValueError, match='outside'):
    tok.decode([49408])


def test_custom_vocab_path(tmp_path, tok):
  res = (importlib.resources.files('cosmos_jax') / 'assets'
         / tok_lib.VOCAB_FILENAME)
  plain = tmp_path / 'bpe.txt'
  plain.write_bytes(gzip.decompress(res.read_bytes()))
  text = ['a photo of Zürich', 'ﬁsh &amp; chips']
  np.testing.assert_array_equal(tok_lib.Tokenizer(vocab_path=plain)(text),
                                tok(text))
  short = tmp_path / 'short.txt'
  short.write_text('#version: 0.2\ni n\nt h\n')
  with pytest.raises(ValueError, match='merges'):
    tok_lib.Tokenizer(vocab_path=str(short))


# Bad input.


@pytest.mark.parametrize('bad, type_name', [(None, 'NoneType'),
                                            (b'a cat', 'bytes'), (3, 'int')])
def test_non_string_element_raises(tok, bad, type_name):
  with pytest.raises(TypeError, match=rf'texts\[1\].*{type_name}'):
    tok(['a cat', bad, 'a dog'])
  with pytest.raises(TypeError, match=rf'texts\[1\].*{type_name}'):
    tok_lib.tokenize(['a cat', bad])


@pytest.mark.parametrize('bad', [None, b'a cat', 3])
def test_non_string_input_raises(tok, bad):
  with pytest.raises(TypeError):
    tok(bad)
  with pytest.raises(TypeError):
    tok.encode(bad)


@pytest.mark.parametrize('context_length', [1, 0, -5])
def test_bad_context_length_raises(tok, context_length):
  with pytest.raises(ValueError, match='context_length'):
    tok('a cat', context_length=context_length)
  with pytest.raises(ValueError, match='context_length'):
    tok_lib.tokenize('a cat', context_length=context_length)
  with pytest.raises(ValueError, match='context_length'):
    tok_lib.Tokenizer(context_length=context_length)
