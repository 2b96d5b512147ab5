"""Test set-up. Without CUDA, Triton kernels run under its interpreter: TRITON_INTERPRET must
be set before triton is first imported, so it is set here, before any test module loads."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _plan_cache(tmp_path_factory):
    """remat's plan cache in a temporary folder: tests never write to the home directory, and
    a run starts with no plans from an earlier one."""
    saved = os.environ.get("REWRITE_PLAN_CACHE")
    os.environ["REWRITE_PLAN_CACHE"] = str(tmp_path_factory.mktemp("plans"))
    yield
    if saved is None:
        os.environ.pop("REWRITE_PLAN_CACHE", None)
    else:
        os.environ["REWRITE_PLAN_CACHE"] = saved


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
