"""The CLI re-executes itself once with glibc's malloc tunables (see cosmos_jax/hostenv.py)."""

import os
import subprocess
import sys

import pytest

from cosmos_jax import hostenv

ALL = ['glibc.malloc.mmap_threshold=33554432', 'glibc.malloc.trim_threshold=4294967296',
       'glibc.malloc.hugetlb=1']


@pytest.fixture
def linux_glibc_with_thp(monkeypatch):
  monkeypatch.setattr(hostenv.sys, 'platform', 'linux')
  monkeypatch.setattr(hostenv, '_glibc_version', lambda: (2, 36))
  monkeypatch.setattr(hostenv, '_thp_available', lambda: True)
  for name in ('GLIBC_TUNABLES', hostenv.OPT_OUT, hostenv.ORIGINAL):
    monkeypatch.delenv(name, raising=False)


class Execve(Exception):
  pass


def capture_execve(monkeypatch):
  def execve(path, argv, env):
    raise Execve(path, argv, env)
  monkeypatch.setattr(hostenv.os, 'execve', execve)


def reexec(monkeypatch, argv=('variants',)):
  capture_execve(monkeypatch)
  with pytest.raises(Execve) as e:
    hostenv.reexec_with_malloc_tuning(list(argv))
  return e.value.args


def test_reexec_runs_the_cli_again_with_the_tunables_added(linux_glibc_with_thp, monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=4')
  path, argv, env = reexec(monkeypatch, ['bench', '--config', 'configs/demo.py'])
  assert path == sys.executable
  assert argv == [sys.executable, '-m', 'cosmos_jax.cli', 'bench', '--config', 'configs/demo.py']
  assert env['GLIBC_TUNABLES'] == ':'.join(['glibc.malloc.arena_max=4'] + ALL)
  assert env[hostenv.ORIGINAL] == 'glibc.malloc.arena_max=4'


def test_a_tunable_the_caller_set_is_kept(linux_glibc_with_thp, monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.trim_threshold=0')
  _, _, env = reexec(monkeypatch)
  assert env['GLIBC_TUNABLES'] == ('glibc.malloc.trim_threshold=0:'
                                   'glibc.malloc.mmap_threshold=33554432:glibc.malloc.hugetlb=1')


def test_no_huge_pages_where_the_kernel_disables_them(linux_glibc_with_thp, monkeypatch):
  monkeypatch.setattr(hostenv, '_thp_available', lambda: False)
  _, _, env = reexec(monkeypatch)
  assert env['GLIBC_TUNABLES'] == ':'.join(ALL[:2])
  assert env[hostenv.ORIGINAL] == ''


@pytest.mark.parametrize('case', ['already_set', 'opted_out', 'old_glibc', 'musl', 'macos'])
def test_no_reexec_where_it_does_not_apply(case, linux_glibc_with_thp, monkeypatch):
  capture_execve(monkeypatch)
  if case == 'already_set':
    monkeypatch.setenv('GLIBC_TUNABLES', ':'.join(ALL))
  elif case == 'opted_out':
    monkeypatch.setenv(hostenv.OPT_OUT, '1')
  elif case == 'old_glibc':
    monkeypatch.setattr(hostenv, '_glibc_version', lambda: (2, 31))
  elif case == 'musl':
    monkeypatch.setattr(hostenv, '_glibc_version', lambda: ())
  else:
    monkeypatch.setattr(hostenv.sys, 'platform', 'darwin')
  hostenv.reexec_with_malloc_tuning(['variants'])   # returns instead of replacing the process


@pytest.mark.parametrize('caller', ['', 'glibc.malloc.arena_max=4'])
def test_caller_environment_undoes_the_reexec(caller, linux_glibc_with_thp, monkeypatch):
  if caller:
    monkeypatch.setenv('GLIBC_TUNABLES', caller)
  _, _, env = reexec(monkeypatch)
  monkeypatch.setattr(hostenv.os, 'environ', env)
  restored = hostenv.caller_environment()
  assert restored.get('GLIBC_TUNABLES') == (caller or None)
  assert hostenv.ORIGINAL not in restored


def test_thp_setting_is_read_from_the_kernel_file(tmp_path, monkeypatch):
  f = tmp_path / 'enabled'
  monkeypatch.setattr(hostenv, 'THP_SETTING', str(f))
  assert not hostenv._thp_available()            # no such file
  f.write_text('always [madvise] never\n')
  assert hostenv._thp_available()
  f.write_text('always madvise [never]\n')
  assert not hostenv._thp_available()


def test_the_program_reexecutes_once_and_runs():
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', hostenv.OPT_OUT, hostenv.ORIGINAL)}
  code = ('import os, sys; sys.argv = ["cosmos-jax", "variants"]; '
          'print("TUNABLES", os.environ.get("GLIBC_TUNABLES")); '
          'from cosmos_jax import cli; cli.run()')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert 'ViT-B-16' in out.stdout and out.stdout.count('ViT-B-16') == 1
  if hostenv._glibc_version() >= (2, 35):
    # The child prints nothing of the -c code; the parent printed before the exec.
    assert out.stdout.count('TUNABLES') == 1
