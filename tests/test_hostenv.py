"""The CLI re-executes itself once with glibc's huge-page tunable (see cosmos_jax/hostenv.py)."""

import os
import subprocess
import sys

import pytest

from cosmos_jax import hostenv


@pytest.fixture
def linux_glibc_with_thp(monkeypatch):
  monkeypatch.setattr(hostenv.sys, 'platform', 'linux')
  monkeypatch.setattr(hostenv, '_glibc_version', lambda: (2, 36))
  monkeypatch.setattr(hostenv, '_thp_available', lambda: True)
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.delenv(hostenv.OPT_OUT, raising=False)


class Execve(Exception):
  pass


def capture_execve(monkeypatch):
  def execve(path, argv, env):
    raise Execve(path, argv, env)
  monkeypatch.setattr(hostenv.os, 'execve', execve)


def test_reexec_runs_the_cli_again_with_the_tunable_added(linux_glibc_with_thp, monkeypatch):
  capture_execve(monkeypatch)
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=4')
  with pytest.raises(Execve) as e:
    hostenv.reexec_with_huge_pages(['bench', '--config', 'configs/demo.py'])
  path, argv, env = e.value.args
  assert path == sys.executable
  assert argv == [sys.executable, '-m', 'cosmos_jax.cli', 'bench', '--config', 'configs/demo.py']
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('case', ['already_set', 'opted_out', 'old_glibc', 'thp_never', 'musl',
                                  'macos'])
def test_no_reexec_where_it_does_not_apply(case, linux_glibc_with_thp, monkeypatch):
  capture_execve(monkeypatch)
  if case == 'already_set':
    monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  elif case == 'opted_out':
    monkeypatch.setenv(hostenv.OPT_OUT, '1')
  elif case == 'old_glibc':
    monkeypatch.setattr(hostenv, '_glibc_version', lambda: (2, 31))
  elif case == 'thp_never':
    monkeypatch.setattr(hostenv, '_thp_available', lambda: False)
  elif case == 'musl':
    monkeypatch.setattr(hostenv, '_glibc_version', lambda: ())
  else:
    monkeypatch.setattr(hostenv.sys, 'platform', 'darwin')
  hostenv.reexec_with_huge_pages(['variants'])   # returns instead of replacing the process


def test_thp_setting_is_read_from_the_kernel_file(tmp_path, monkeypatch):
  f = tmp_path / 'enabled'
  monkeypatch.setattr(hostenv, 'THP_SETTING', str(f))
  assert not hostenv._thp_available()            # no such file
  f.write_text('always [madvise] never\n')
  assert hostenv._thp_available()
  f.write_text('always madvise [never]\n')
  assert not hostenv._thp_available()


def test_the_program_reexecutes_once_and_runs():
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hostenv.OPT_OUT)}
  code = ('import sys; sys.argv = ["cosmos-jax", "variants"]; '
          'from cosmos_jax import cli; cli.run()')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert 'ViT-B-16' in out.stdout and out.stdout.count('ViT-B-16') == 1
