"""devices.release_freed_memory gives freed heap memory back to the operating system.

Checked in a fresh process (its own heap), by its resident memory: 400 tensors of 1 MB are made
and filled, after one 30 MB tensor was freed (glibc then serves pieces under 30 MB from the heap
instead of mmap, as it does in a training step), and all but the last are freed. glibc keeps them:
the resident memory stays up. After release_freed_memory it must fall by at least 300 MB.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
import devices

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

del_me = torch.ones(30 * 2**20 // 4)  # freed: glibc raises its mmap threshold past 1 MB
del del_me
pieces = [torch.ones(2**20 // 4) for _ in range(400)]  # 400 MB, filled (resident)
last = pieces[-1]
del pieces
held = rss_mb()
released = devices.release_freed_memory()
print(held, rss_mb(), released)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_release_freed_memory_returns_the_freed_heap():
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    held, after, released = out.stdout.split()
    if released != "True":
        pytest.skip("not glibc: nothing to release with")
    assert float(held) - float(after) > 300, out.stdout
