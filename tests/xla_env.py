"""XLA_FLAGS for the processes a test starts: the suite's own flags (``conftest.py``), with
the CPU device count set to what that process needs."""

import os
import re

_DEVICE_COUNT = re.compile(r'--xla_force_host_platform_device_count=\S+')


def xla_flags(devices: int) -> str:
  others = _DEVICE_COUNT.sub('', os.environ.get('XLA_FLAGS', '')).split()
  return ' '.join([f'--xla_force_host_platform_device_count={devices}', *others])
