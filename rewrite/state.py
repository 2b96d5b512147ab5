"""What running a model changes besides its outputs, kept as it was: buffers a run mutates
(batch-norm statistics, counters) and the random state (dropout draws from it). The checks and
measurements that run the user's model or its graphs use these, so they leave no trace."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def buffers_kept(*modules: torch.nn.Module):
    """The buffers of ``modules`` are set back, in place, to their values before the block."""
    buffers = {id(b): (b, b.detach().clone()) for m in modules for b in m.buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in buffers.values():
                tensor.copy_(value)


def random_state_kept():
    """``torch.random.fork_rng`` over the CPU and every GPU already in use (manual_seed reseeds
    every GPU too), without initialising CUDA where it is not."""
    gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() and torch.cuda.is_initialized() else range(0)
    return torch.random.fork_rng(devices=gpus)
