"""trainer/memory.py: freed step-sized memory stays in the process (no page faults to reuse it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")

PROBE = """
import resource, sys, torch
from manytask.trainer.memory import keep_freed_memory
applied = keep_freed_memory()
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20)  # 64 MiB, like a many-task step's activation
    x.fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# The first steps grow the heap until freed blocks coalesce into one the step fits in: 2 to
# 13 steps in repeated runs on the CI machine (it depends on where small objects land).
for _ in range(30):
    faults_of_one_step()
print(applied, max(faults_of_one_step() for _ in range(5)))
"""


def probe(**env: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_second_step_reuses_memory_without_page_faults():
    applied, faults = probe()
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert applied and faults < pages // 20, f"{faults} page faults re-touching {pages} pages"


def test_opt_out_leaves_the_allocator_alone():
    applied, faults = probe(MANYTASK_KEEP_FREED_MEMORY="0")
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert not applied and faults > pages // 2  # glibc's default: every step faults its pages in
