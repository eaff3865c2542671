"""host_memory: freed memory reused without page faults, only where it is safe to set."""

import os
import subprocess
import sys

import pytest

# A fresh process: keep_freed_memory() first (as the entry points do), then 200 MB taken
# from malloc, written and freed three times, as XLA:CPU does with a program's temporary
# buffer; prints what keep_freed_memory returned and the page faults of the last round.
CHILD = """
import ctypes, resource
from cnneb_jax.host_memory import keep_freed_memory
kept = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(200 << 20)
    ctypes.memset(p, 1, 200 << 20)
    libc.free(p)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_child(env_extra: dict, code: str = CHILD) -> tuple[bool, int]:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    return out[0] == "True", int(out[1]) if len(out) > 1 else 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc on Linux")
def test_freed_memory_is_reused_without_page_faults():
    kept, faults = run_child({"CNNEB_HOST_MEMORY": ""})
    assert kept
    plain_kept, plain_faults = run_child({"CNNEB_HOST_MEMORY": "default"})
    assert not plain_kept
    # 200 MB is about 49,000 pages: glibc maps them afresh each time unless kept
    assert plain_faults > 40_000
    assert faults < 2_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc on Linux")
def test_does_nothing_once_other_threads_run():
    code = """
import threading, time
threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
from cnneb_jax.host_memory import keep_freed_memory
print(keep_freed_memory())
"""
    kept, _ = run_child({"CNNEB_HOST_MEMORY": ""}, code)
    assert not kept
