"""The collectives of a compiled step, counted from its optimised HLO text.

Each collective counts once per execution: an async pair (``all-gather-start`` /
``all-gather-done``) counts at its ``-done``, whose result is the collective's output; ops
inside fusions and called computations count through the call graph from ENTRY; a ``while``
body counts ``known_trip_count`` times, else the bound its condition compares the counter with
(JAX's loops count from 0 up to a constant), else once, and noted. XLA:TPU carries one async
collective through several "async collective fusions", each holding a copy of the op with the
same ``chain_id``: a chain counts once.
Its bytes are those of the op's result shape on one device (a tuple's elements summed): the
gathered array for an all-gather, the scattered shard for a reduce-scatter, the reduced array
for an all-reduce. XLA:TPU writes a reduce-scatter as a fusion calling an ``all-reduce-scatter``
computation (an all-reduce then a slice); that fusion counts as one reduce-scatter of its result.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
                'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1, 'f8e4m3': 1,
                'f8e4m3fnuz': 1, 'f8e5m2fnuz': 1, 'f8e3m4': 1}
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\]')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(.*)$')
# Edges of the call graph: fusion/call/async bodies, while bodies, conditional branches.
_CALLS = re.compile(r'\b(calls|body|to_apply|true_computation|false_computation)=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_CONDITION = re.compile(r'\bcondition=%?([\w.\-]+)')
_CHAIN = re.compile(r'\bchain_id="?(\d+)')
_OPERANDS = re.compile(r'%([\w.\-]+)')
_REDUCE_SCATTER_FUSION = 'all-reduce-scatter'


@dataclasses.dataclass
class Collective:
  kind: str
  bytes: int
  name: str


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  attrs: str


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string ('f32[16,256]{1,0}', or a tuple of such)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue   # token[] and the like
    count = 1
    for d in filter(None, dims.split(',')):
      count *= int(d)
    total += count * _DTYPE_BYTES[dtype]
  return int(total)


def _split_shape(rhs: str) -> tuple[str, str]:
  """'(f32[2], u32[]) all-gather-start(...' -> ('(f32[2], u32[])', 'all-gather-start(...')."""
  if rhs.startswith('('):
    depth = 0
    for i, ch in enumerate(rhs):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        return rhs[:i + 1], rhs[i + 1:].lstrip()
  shape, _, rest = rhs.partition(' ')
  return shape, rest.lstrip()


def parse_instruction(line: str) -> Instruction | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  shape, rest = _split_shape(m.group(2))
  op = re.match(r'([a-z][\w\-]*)\(', rest)
  if not op:
    return None
  return Instruction(m.group(1), shape, op.group(1), rest[op.end():])


def parse_computations(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """HLO module text -> ({computation: instructions}, the ENTRY computation's name)."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = '', None
  for line in text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header and not line.startswith((' ', 'HloModule')):
        current = header.group(2)
        computations[current] = []
        if header.group(1):
          entry = current
      continue
    if line.startswith('}'):
      current = None
      continue
    instruction = parse_instruction(line)
    if instruction:
      computations[current].append(instruction)
  if not entry:
    raise ValueError('HLO text has no ENTRY computation')
  return computations, entry


def loop_trips(inst: Instruction, computations: dict[str, list[Instruction]]) -> int | None:
  """A while loop's trip count: XLA's ``known_trip_count``, else N from a condition
  ``counter < N`` (``<= N``: N + 1) against an integer constant; None when neither is there."""
  known = _TRIP_COUNT.search(inst.attrs)
  if known:
    return int(known.group(1))
  condition = _CONDITION.search(inst.attrs)
  body = computations.get(condition.group(1), []) if condition else []
  constants = {i.name: i.attrs.split(')')[0].strip() for i in body if i.opcode == 'constant'}
  for i in body:
    direction = re.search(r'direction=(LT|LE)\b', i.attrs)
    if i.opcode != 'compare' or not direction:
      continue
    bounds = [constants[o] for o in _OPERANDS.findall(i.attrs.split(')')[0]) if o in constants]
    if len(bounds) == 1 and re.fullmatch(r'-?\d+', bounds[0]):
      return max(0, int(bounds[0]) + (direction.group(1) == 'LE'))
  return None


def _callees(inst: Instruction,
             computations: dict[str, list[Instruction]]) -> Iterator[tuple[str, int | None]]:
  """(computation, times per execution of ``inst``; None: a while body of unknown count)."""
  if inst.opcode in ('async-update', 'async-done'):
    return   # the wrapped computation counts once, at async-start
  trips = loop_trips(inst, computations) if inst.opcode == 'while' else 1
  for key, name in _CALLS.findall(inst.attrs):
    yield name, trips if key == 'body' else 1
  for group in _BRANCHES.findall(inst.attrs):
    for name in group.split(','):
      yield name.strip().lstrip('%'), 1


def _kind(inst: Instruction) -> str | None:
  op = inst.opcode
  if op.endswith('-start') or op.endswith('-update'):
    return None
  op = op[:-len('-done')] if op.endswith('-done') else op
  if op == 'fusion' and f'calls=%{_REDUCE_SCATTER_FUSION}' in inst.attrs.replace(' ', ''):
    return 'reduce-scatter'
  return op if op in KINDS else None


def collectives(text: str) -> tuple[list[tuple[Collective, int]], int]:
  """Every collective reached from ENTRY with its executions per step; and the number of while
  loops whose trip count XLA did not give (their bodies are counted once)."""
  computations, entry = parse_computations(text)
  found: list[tuple[Collective, int]] = []
  chains: set[str] = set()
  unknown_loops = 0
  stack = [(entry, 1)]
  while stack:
    name, times = stack.pop()
    for inst in computations.get(name, ()):
      kind = _kind(inst)
      if kind:
        chain = _CHAIN.search(inst.attrs)
        if not (chain and chain.group(1) in chains):
          found.append((Collective(kind, shape_bytes(inst.shape), inst.name), times))
        if chain:
          chains.add(chain.group(1))
        if kind == 'reduce-scatter':
          continue   # its all-reduce inside is the same collective
      for callee, trips in _callees(inst, computations):
        if trips is None:
          unknown_loops += 1
          trips = 1
        stack.append((callee, times * trips))
  return found, unknown_loops


def collective_summary(text: str) -> tuple[dict[str, dict[str, int]], int]:
  """({kind: {'count', 'bytes'}} per step and device for every kind of ``KINDS``, zeros
  included; the number of while loops counted once for want of a trip count)."""
  found, unknown = collectives(text)
  summary = {k: {'count': 0, 'bytes': 0} for k in KINDS}
  for c, times in found:
    summary[c.kind]['count'] += times
    summary[c.kind]['bytes'] += c.bytes * times
  return summary, unknown
