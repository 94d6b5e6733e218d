"""Model loads run in a thread of their own at a lower CPU priority than request handling."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from serve.app import LOAD_NICENESS, _in_low_priority_thread


def _niceness_of_this_thread() -> tuple[int, str]:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), threading.current_thread().name


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_the_load_yields_the_cpu_and_nothing_else_does():
    before = os.getpriority(os.PRIO_PROCESS, 0)

    async def main():
        loaded = await _in_low_priority_thread(_niceness_of_this_thread)
        served = await asyncio.to_thread(_niceness_of_this_thread)  # where inference runs
        return loaded, served

    (loaded_nice, loaded_thread), (served_nice, _) = asyncio.run(main())
    assert loaded_thread == "ct-model-load"
    assert loaded_nice == min(19, before + LOAD_NICENESS)
    assert served_nice == before and os.getpriority(os.PRIO_PROCESS, 0) == before


def test_errors_reach_the_caller():
    def broken():
        raise FileNotFoundError("model.safetensors")

    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        asyncio.run(_in_low_priority_thread(broken))
