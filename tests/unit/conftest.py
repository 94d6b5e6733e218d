"""Fixtures shared by unit tests."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="session")
def process_group():
    """One single-process gloo group for every DeepSpeed test of the session.

    Session-wide on purpose: DeepSpeed caches its communication backend the first time
    ``deepspeed.init_distributed`` runs, so a group destroyed and created again by another test
    module leaves DeepSpeed holding the destroyed one ("Group ... is not registered").
    """
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
