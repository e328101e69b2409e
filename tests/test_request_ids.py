"""Request ids made by the gateway: random, unique, and never shared with a forked child."""

from __future__ import annotations

import os
import re

from gateway.exchange import _RequestIds


def test_ids_are_128_random_bits_and_unique_across_pool_refills() -> None:
    ids = _RequestIds()
    made = [ids() for _ in range(1000)]  # about four pools
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in made)
    assert len(set(made)) == len(made)


def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    ids = _RequestIds()
    ids()  # the parent's pool is filled: a naive copy would hand the child the same ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, "".join(ids() for _ in range(10)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 4096).decode()
    parent = "".join(ids() for _ in range(10))
    assert len(child) == 320 and child != parent
