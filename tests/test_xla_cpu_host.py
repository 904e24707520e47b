"""The CLI re-executes itself once with glibc's malloc tunables and the block cache (see
cosmos_jax/xla_cpu/host.py and cosmos_jax/xla_cpu/native/block_cache.c), only for the tuned
commands on a host without an accelerator, as ``perf.cpu_tuning`` says."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from cosmos_jax.xla_cpu import host

ALL = ['glibc.malloc.mmap_threshold=33554432', 'glibc.malloc.trim_threshold=4294967296',
       'glibc.malloc.hugetlb=1']


@pytest.fixture
def linux_glibc_with_thp(monkeypatch):
  monkeypatch.setattr(host.sys, 'platform', 'linux')
  monkeypatch.setattr(host, '_glibc_version', lambda: (2, 36))
  monkeypatch.setattr(host, '_thp_available', lambda: True)
  for name in ('GLIBC_TUNABLES', 'LD_PRELOAD', host.OPT_OUT, *host.CALLER_VARS.values()):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(host, 'block_cache_library', lambda: '/cache/block_cache-0.so')
  monkeypatch.setattr(host, 'accelerator_on_host', lambda: None)


class Execve(Exception):
  pass


def capture_execve(monkeypatch):
  def execve(path, argv, env):
    raise Execve(path, argv, env)
  monkeypatch.setattr(host.os, 'execve', execve)


def reexec(monkeypatch, argv=('train', '--config', 'configs/demo.py')):
  capture_execve(monkeypatch)
  with pytest.raises(Execve) as e:
    host.reexec_with_malloc_tuning(list(argv))
  return e.value.args


def test_reexec_runs_the_cli_again_with_the_tunables_added(linux_glibc_with_thp, monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=4')
  path, argv, env = reexec(monkeypatch, ['bench', '--config', 'configs/demo.py'])
  assert path == sys.executable
  assert argv == [sys.executable, '-m', 'cosmos_jax.cli', 'bench', '--config', 'configs/demo.py']
  assert env['GLIBC_TUNABLES'] == ':'.join(['glibc.malloc.arena_max=4'] + ALL)
  assert env['LD_PRELOAD'] == '/cache/block_cache-0.so'
  assert env['COSMOS_JAX_CALLER_GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=4'
  assert env['COSMOS_JAX_CALLER_LD_PRELOAD'] == ''


def test_the_block_cache_goes_first_and_is_left_out_without_a_compiler(linux_glibc_with_thp,
                                                                        monkeypatch):
  monkeypatch.setenv('LD_PRELOAD', 'libother.so')
  _, _, env = reexec(monkeypatch)
  assert env['LD_PRELOAD'] == '/cache/block_cache-0.so:libother.so'
  monkeypatch.setattr(host, 'block_cache_library', lambda: None)
  _, _, env = reexec(monkeypatch)
  assert env['LD_PRELOAD'] == 'libother.so'


def test_a_tunable_the_caller_set_is_kept(linux_glibc_with_thp, monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.trim_threshold=0')
  _, _, env = reexec(monkeypatch)
  assert env['GLIBC_TUNABLES'] == ('glibc.malloc.trim_threshold=0:'
                                   'glibc.malloc.mmap_threshold=33554432:glibc.malloc.hugetlb=1')


def test_no_huge_pages_where_the_kernel_disables_them(linux_glibc_with_thp, monkeypatch):
  monkeypatch.setattr(host, '_thp_available', lambda: False)
  _, _, env = reexec(monkeypatch)
  assert env['GLIBC_TUNABLES'] == ':'.join(ALL[:2])


@pytest.mark.parametrize('case', ['reexecuted', 'opted_out', 'old_glibc', 'musl', 'macos'])
def test_no_reexec_where_it_does_not_apply(case, linux_glibc_with_thp, monkeypatch):
  capture_execve(monkeypatch)
  if case == 'reexecuted':
    monkeypatch.setenv('COSMOS_JAX_CALLER_GLIBC_TUNABLES', '')
  elif case == 'opted_out':
    monkeypatch.setenv(host.OPT_OUT, '1')
  elif case == 'old_glibc':
    monkeypatch.setattr(host, '_glibc_version', lambda: (2, 31))
  elif case == 'musl':
    monkeypatch.setattr(host, '_glibc_version', lambda: ())
  else:
    monkeypatch.setattr(host.sys, 'platform', 'darwin')
  host.reexec_with_malloc_tuning(['bench', '--config', 'configs/demo.py'])   # returns


@pytest.mark.parametrize('caller', [{}, {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4',
                                     'LD_PRELOAD': 'libother.so'}])
def test_caller_environment_undoes_the_reexec(caller, linux_glibc_with_thp, monkeypatch):
  for name, value in caller.items():
    monkeypatch.setenv(name, value)
  _, _, env = reexec(monkeypatch)
  monkeypatch.setattr(host.os, 'environ', env)
  restored = host.caller_environment()
  for name in ('GLIBC_TUNABLES', 'LD_PRELOAD'):
    assert restored.get(name) == caller.get(name)
  assert not set(host.CALLER_VARS.values()) & set(restored)


@pytest.mark.parametrize('argv', [
    ['variants'], ['eval', '--task', 'synthetic'], ['convert', 'a.pt', 'b'],   # not tuned
    ['train', '--config', 'configs/demo.py', '--config.perf.cpu_tuning=off'],
    ['bench', '--config', 'configs/demo.py', '--config.perf.cpu_tuning', 'off'],
])
def test_no_reexec_for_other_commands_or_when_switched_off(argv, linux_glibc_with_thp,
                                                           monkeypatch):
  capture_execve(monkeypatch)
  host.reexec_with_malloc_tuning(argv)


def test_the_config_files_own_switch_is_read(tmp_path, linux_glibc_with_thp, monkeypatch):
  capture_execve(monkeypatch)
  recipe = tmp_path / 'off.py'
  recipe.write_text('from cosmos_jax.config import base_config\n'
                    'def get_config(arg=None):\n'
                    '  c = base_config(); c.perf.cpu_tuning = "off"; return c\n')
  host.reexec_with_malloc_tuning(['train', '--config', str(recipe)])   # returns
  reexec(monkeypatch, ['train', '--config', str(recipe), '--config.perf.cpu_tuning=on'])


@pytest.mark.parametrize('accelerator', ['/dev/nvidia0', 'TPU_ACCELERATOR_TYPE=v5litepod-8'])
def test_an_accelerator_host_is_never_tuned_unless_asked(accelerator, linux_glibc_with_thp,
                                                         monkeypatch):
  capture_execve(monkeypatch)
  monkeypatch.setattr(host, 'accelerator_on_host', lambda: accelerator)
  host.reexec_with_malloc_tuning(['train', '--config', 'configs/demo.py'])   # returns
  reexec(monkeypatch, ['train', '--config', 'configs/demo.py', '--config.perf.cpu_tuning=on'])


def test_accelerators_are_found_from_device_files_and_variables(monkeypatch):
  monkeypatch.setattr(host.glob, 'glob', lambda pattern: [])
  assert host.accelerator_on_host({}) is None
  assert host.accelerator_on_host({'JAX_PLATFORMS': 'cpu'}) is None
  assert host.accelerator_on_host({'CUDA_VISIBLE_DEVICES': ''}) is None
  assert host.accelerator_on_host({'JAX_PLATFORMS': 'tpu'}) == 'JAX_PLATFORMS=tpu'
  assert host.accelerator_on_host({'CUDA_VISIBLE_DEVICES': '0,1'}) == 'CUDA_VISIBLE_DEVICES=0,1'
  assert host.accelerator_on_host({'TPU_WORKER_ID': '3'}) == 'TPU_WORKER_ID=3'
  monkeypatch.setattr(host.glob, 'glob',
                      lambda pattern: ['/dev/accel0'] if 'accel' in pattern else [])
  assert host.accelerator_on_host({}) == '/dev/accel0'


@pytest.mark.parametrize('variable', ['CUDA_VISIBLE_DEVICES=0', 'TPU_ACCELERATOR_TYPE=v5litepod-8'])
def test_a_real_process_on_a_simulated_accelerator_host_is_not_reexecuted(variable, tmp_path):
  """Nothing is re-executed or preloaded: the process goes on with the caller's environment."""
  name, value = variable.split('=')
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD', host.OPT_OUT,
                      *host.CALLER_VARS.values())}
  env.update({name: value, 'XDG_CACHE_HOME': str(tmp_path)})
  code = ('import os; from cosmos_jax.xla_cpu import host; '
          'host.reexec_with_malloc_tuning(["train", "--config", "configs/demo.py"]); '
          'print("SAME PROCESS", os.environ.get("GLIBC_TUNABLES"), os.environ.get("LD_PRELOAD"))')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == 'SAME PROCESS None None'
  assert not list(tmp_path.glob('cosmos_jax/block_cache-*'))   # nothing built either


def test_thp_setting_is_read_from_the_kernel_file(tmp_path, monkeypatch):
  f = tmp_path / 'enabled'
  monkeypatch.setattr(host, 'THP_SETTING', str(f))
  assert not host._thp_available()            # no such file
  f.write_text('always [madvise] never\n')
  assert host._thp_available()
  f.write_text('always madvise [never]\n')
  assert not host._thp_available()


def test_the_program_reexecutes_once_and_runs(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD', host.OPT_OUT,
                      *host.CALLER_VARS.values())}
  env['XDG_CACHE_HOME'] = str(tmp_path)
  code = ('import os, sys; sys.argv = ["cosmos-jax", "bench", "--help"]; '
          'print("PARENT"); from cosmos_jax import cli; cli.run()')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.count('usage: cosmos-jax bench') == 1
  assert out.stdout.count('PARENT') == 1   # the child runs the CLI module, not the -c code
  if host._glibc_version() >= (2, 35) and shutil.which('cc'):
    assert list((tmp_path / 'cosmos_jax').glob('block_cache-*.so'))


# --- the block cache itself, preloaded into a real interpreter -------------------------------

@pytest.fixture(scope='module')
def block_cache(tmp_path_factory):
  if not sys.platform.startswith('linux') or not host._glibc_version():
    pytest.skip('the block cache is for glibc on Linux')
  if not shutil.which('cc'):
    pytest.skip('no C compiler')
  cache = tmp_path_factory.mktemp('cache')
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('XDG_CACHE_HOME', str(cache))
    library = host.block_cache_library()
  assert library and library.startswith(str(cache))
  return library


def run_preloaded(library, code):
  env = dict(os.environ, LD_PRELOAD=library or '')
  prelude = textwrap.dedent("""
      import ctypes, threading
      libc = ctypes.CDLL(None)
      libc.malloc.restype = libc.calloc.restype = libc.realloc.restype = ctypes.c_void_p
      libc.malloc.argtypes = [ctypes.c_size_t]
      libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
      libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
      libc.free.argtypes = [ctypes.c_void_p]
      libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
      libc.malloc_usable_size.restype = ctypes.c_size_t
      libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                                      ctypes.c_size_t]
      MB = 1 << 20
      def memalign(align, size):
        out = ctypes.c_void_p()
        assert libc.posix_memalign(ctypes.byref(out), align, size) == 0
        return out.value
      """)
  out = subprocess.run([sys.executable, '-c', prelude + textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stdout


REUSE = """
      a = memalign(64, 100 * MB)             # XLA's temporaries: one aligned block per step
      ctypes.memset(a, 7, 100 * MB)
      libc.free(a)
      b = memalign(64, 95 * MB)              # the next step: at most 1/8 smaller
      assert b == a and b % 64 == 0, (a, b)
      assert ctypes.string_at(b, 4) == bytes([7] * 4)   # not a fresh (zeroed) mapping
      assert libc.malloc_usable_size(b) >= 100 * MB
      c = libc.malloc(100 * MB)              # the block is taken: a fresh one
      assert c != b
      libc.free(c)
      d = libc.malloc(70 * MB)               # more than 1/8 smaller than every kept block
      assert d not in (b, c)
      e = libc.realloc(b, 300 * MB)          # glibc's own chunk: realloc keeps the contents
      assert ctypes.string_at(e + 100 * MB - 4, 4) == bytes([7] * 4)
      libc.free(e); libc.free(d)
      small = libc.malloc(1000)
      libc.free(small)
      assert libc.malloc(1000) == small      # small blocks are glibc's business as before
      """


def test_a_freed_large_block_is_handed_back_for_the_next_step(block_cache):
  run_preloaded(block_cache, REUSE)


def test_without_the_block_cache_glibc_maps_a_fresh_block(block_cache):
  with pytest.raises(AssertionError, match='in <module>'):   # the child's assertion
    run_preloaded(None, REUSE)


def test_calloc_never_gets_a_kept_block(block_cache):
  run_preloaded(block_cache, """
      a = libc.malloc(80 * MB)
      ctypes.memset(a, 255, 80 * MB)
      libc.free(a)
      z = libc.calloc(1, 80 * MB)
      assert z != a
      assert ctypes.string_at(z, 80 * MB).count(0) == 80 * MB
      """)


def test_an_invalid_alignment_is_still_rejected_while_a_block_is_kept(block_cache):
  run_preloaded(block_cache, """
      a = memalign(64, 100 * MB)
      libc.free(a)                            # kept
      out = ctypes.c_void_p()
      assert a & (a - 1)                      # a itself: an alignment the kept block meets,
      assert libc.posix_memalign(ctypes.byref(out), a, 100 * MB) == 22   # but invalid: EINVAL
      assert memalign(64, 100 * MB) == a
      """)


def test_threads_allocating_large_blocks_concurrently(block_cache):
  print(run_preloaded(block_cache, """
      def work(i):
        for _ in range(50):
          blocks = [libc.malloc((64 + 8 * i + k) * MB) for k in range(3)]
          for b in blocks:
            ctypes.memset(b, i, 4096)
            assert ctypes.string_at(b, 1) == bytes([i])
          for b in blocks:
            libc.free(b)
      threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
      for t in threads: t.start()
      for t in threads: t.join()
      print('ok')
      """))


def test_rehome_state_copies_the_arrays_keeping_values_and_shardings(monkeypatch):
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  big = jax.device_put(np.arange(8 * 6, dtype=np.float32).reshape(8, 6),
                       NamedSharding(mesh, P('data')))
  tree = {'w': big, 'step': jax.numpy.int32(3)}

  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.mmap_threshold=33554432')
  assert host.rehome_state(tree) is tree   # no huge pages: nothing to gain, nothing done

  monkeypatch.setenv('GLIBC_TUNABLES', ':'.join(ALL))
  moved = host.rehome_state(tree)
  assert moved['w'].sharding == big.sharding
  np.testing.assert_array_equal(moved['w'], np.arange(48).reshape(8, 6))
  assert int(moved['step']) == 3
  old = {s.device: s.data.unsafe_buffer_pointer() for s in big.addressable_shards}
  assert all(s.data.unsafe_buffer_pointer() != old[s.device] for s in moved['w'].addressable_shards)
