"""Everything that makes XLA:CPU fast and would be wrong or useless elsewhere, behind one switch.

``perf.cpu_tuning`` ('auto' | 'on' | 'off') is resolved once, from the run's actual mesh and
host, into a ``CpuTuning``; the model, the step and the loop receive its pieces through small
interfaces and read as the method whatever it says:

  * ``stack``: the towers' body form (``models.layers.BlockStack``), the residual stream's
    cotangent stored between blocks (``stack.py``);
  * ``ordering``: the step's update ordering (``train.step.UpdateOrdering``), so that XLA
    updates the donated state in place (``donation.py``);
  * ``after_first_step``: the state copied onto huge pages once compiled (``host.py``);
  * at start-up, the CLI's malloc tunables and block cache (``host.py``, decided before JAX
    starts, from the host's device files).

'auto' turns it on only for a mesh of exactly one CPU device on a host with no accelerator;
'on' forces it on a one-device CPU mesh; 'off' never. On several devices the stack's loops
would deadlock the shared thread pool, so 'on' there is an error.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

# No JAX import here: the CLI reads ``host`` before JAX starts (and before its re-exec).
from cosmos_jax.xla_cpu import host

if TYPE_CHECKING:
  from jax.sharding import Mesh

MODES = ('auto', 'on', 'off')


@dataclasses.dataclass(frozen=True)
class CpuTuning:
  enabled: bool
  reason: str   # why, for logs and the bench's JSON

  @property
  def stack(self) -> Optional[Any]:
    if not self.enabled:
      return None
    from cosmos_jax.xla_cpu.stack import CpuBlockStack
    return CpuBlockStack()

  @property
  def ordering(self) -> Any:
    from cosmos_jax.train.step import UpdateOrdering
    if not self.enabled:
      return UpdateOrdering()
    from cosmos_jax.xla_cpu.donation import InPlaceOrdering
    return InPlaceOrdering()

  def after_first_step(self, state: Any) -> Any:
    """The state, re-homed onto huge pages where that applies (``host.rehome_state``)."""
    return host.rehome_state(state) if self.enabled else state


def resolve(mode: str, mesh: 'Mesh', accelerator: Optional[str] = 'detect') -> CpuTuning:
  """``perf.cpu_tuning`` for ``mesh`` on this host (``accelerator``: what makes it an
  accelerator host, None for none; 'detect' reads the host)."""
  if mode not in MODES:
    raise ValueError(f'perf.cpu_tuning = {mode!r}: must be one of {", ".join(MODES)}')
  platforms = sorted({d.platform for d in mesh.devices.flat})
  one_cpu = platforms == ['cpu'] and mesh.devices.size == 1
  if mode == 'off':
    return CpuTuning(False, 'perf.cpu_tuning=off')
  if mode == 'on':
    if not one_cpu:
      raise ValueError(f"perf.cpu_tuning='on' needs a mesh of one CPU device; this one has "
                       f'{mesh.devices.size} {"/".join(platforms)} device(s) (use auto or off)')
    return CpuTuning(True, 'perf.cpu_tuning=on')
  if not one_cpu:
    return CpuTuning(False, f'{mesh.devices.size} {"/".join(platforms)} device(s)')
  if accelerator == 'detect':
    accelerator = host.accelerator_on_host()
  if accelerator:
    return CpuTuning(False, f'accelerator host ({accelerator})')
  return CpuTuning(True, 'one CPU device, no accelerator')
