"""codegen.cache: emitted kernels as <sha256>.py files, memoised in the process, repaired when
damaged, shared safely by concurrent processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import codegen
import rewrite  # noqa: F401 - registers torch.ops.rewrite.pointwise
from codegen import cache

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)"
)

REPO = Path(__file__).resolve().parents[2]
KERNEL_FILE = re.compile(r"[0-9a-f]{64}\.py")


@pytest.fixture
def kernel_dir(tmp_path):
    cache.set_cache_dir(tmp_path)
    cache.clear_memory()
    yield tmp_path
    cache.set_cache_dir(None)
    cache.clear_memory()  # the modules point at files in a directory that is going away


def kernel_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".py")


def assert_no_temporaries(directory: Path) -> None:
    assert [name for name in os.listdir(directory) if name.endswith(".tmp")] == []


def delta(before: dict) -> dict:
    return {k: cache.stats[k] - before[k] for k in before}


def _region(x, y):
    return x * 3 - torch.exp(y) * 0.5


def make_inputs(dtype=torch.float32, n=300):
    return torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)


def run_and_check(kernel, x, y):
    with codegen.use_triton_on_cpu():
        out = kernel(x, y)
    ref = _region(x.double(), y.double())
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == ref.shape and torch.isfinite(out).all() and err < 1e-5


def test_write_then_memory_hit_then_disk_hit(kernel_dir):
    kernel = codegen.pointwise(_region, *make_inputs())
    x, y = make_inputs()

    before = dict(cache.stats)
    run_and_check(kernel, x, y)
    assert delta(before) == {"memory_hits": 0, "disk_hits": 0, "writes": 1, "repairs": 0}
    files = kernel_files(kernel_dir)
    assert len(files) == 1 and KERNEL_FILE.fullmatch(files[0].name), files
    assert files[0].read_text() == kernel.source_for(x, y)

    before = dict(cache.stats)
    run_and_check(kernel, *make_inputs())
    assert delta(before) == {"memory_hits": 1, "disk_hits": 0, "writes": 0, "repairs": 0}
    assert kernel_files(kernel_dir) == files

    cache.clear_memory()
    mtime = files[0].stat().st_mtime_ns
    before = dict(cache.stats)
    run_and_check(kernel, *make_inputs())
    assert delta(before) == {"memory_hits": 0, "disk_hits": 1, "writes": 0, "repairs": 0}
    assert kernel_files(kernel_dir) == files and files[0].stat().st_mtime_ns == mtime
    assert_no_temporaries(kernel_dir)


CORRUPTIONS = {
    "truncated": lambda text: text[: len(text) // 2].encode(),
    "garbage": lambda text: b"def (",
    "empty": lambda text: b"",
    "not_utf8": lambda text: b"\xff\xfe\x00def",
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_damaged_file_is_repaired(kernel_dir, corruption):
    kernel = codegen.pointwise(_region, *make_inputs())
    x, y = make_inputs()
    run_and_check(kernel, x, y)
    (path,) = kernel_files(kernel_dir)
    source = path.read_text()
    path.write_bytes(CORRUPTIONS[corruption](source))

    cache.clear_memory()
    before = dict(cache.stats)
    run_and_check(kernel, *make_inputs())
    assert delta(before) == {"memory_hits": 0, "disk_hits": 0, "writes": 1, "repairs": 1}
    assert kernel_files(kernel_dir) == [path]
    assert path.read_text() == source == kernel.source_for(x, y)
    assert_no_temporaries(kernel_dir)


def test_dtypes_get_their_own_files(kernel_dir):
    for dtype in (torch.float32, torch.float16):
        kernel = codegen.pointwise(_region, *make_inputs(dtype))
        with codegen.use_triton_on_cpu():
            kernel(*make_inputs(dtype))
    files = kernel_files(kernel_dir)
    assert len(files) == 2 and all(KERNEL_FILE.fullmatch(f.name) for f in files)
    assert files[0].read_text() != files[1].read_text()
    assert_no_temporaries(kernel_dir)


def test_specialisation_is_part_of_the_key(kernel_dir):
    source = "import triton\n\nVALUE = 1\n"
    first, second = cache.load(source, "rank 1"), cache.load(source, "rank 2")
    assert first is not second and first.VALUE == second.VALUE == 1
    assert len(kernel_files(kernel_dir)) == 2
    assert cache.load(source, "rank 1") is first


def test_environment_variable_names_the_default_directory(tmp_path, monkeypatch):
    cache.set_cache_dir(None)
    monkeypatch.setenv("REWRITE_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert cache.cache_dir() == tmp_path / "kernels"
    cache.set_cache_dir(tmp_path / "mine")
    try:
        assert cache.cache_dir() == tmp_path / "mine"
    finally:
        cache.set_cache_dir(None)


# ---- several processes on one directory ----------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    import torch
    import codegen, rewrite
    from codegen import cache

    def region(x, y):
        return x * 3 - torch.exp(y) * 0.5

    torch.manual_seed(int(sys.argv[1]))
    x = torch.randn(300, requires_grad=True)
    y = torch.randn(300, requires_grad=True)
    kernel = codegen.pointwise(region, x.detach(), y.detach())
    print("ready", flush=True)
    sys.stdin.readline()  # both processes reach the cache at the same moment
    g = torch.randn(300)
    with codegen.use_triton_on_cpu():
        out = kernel(x, y)
        gx, gy = torch.autograd.grad(out, (x, y), g)
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    ref = region(x64, y64)
    rx, ry = torch.autograd.grad(ref, (x64, y64), g.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    right = max(rel(out, ref), rel(gx, rx), rel(gy, ry)) < 1e-5
    print("right" if right else "wrong", cache.stats["writes"] + cache.stats["disk_hits"], flush=True)
    """
)


def test_concurrent_processes_share_the_directory(tmp_path):
    directory = tmp_path / "kernels"
    env = dict(os.environ, TRITON_INTERPRET="1", REWRITE_KERNEL_CACHE=str(directory), PYTHONPATH=str(REPO),
               PYTHONWARNINGS="ignore")  # fmt: skip
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(seed)], env=env, cwd=REPO, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        for seed in (1, 2)
    ]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        results = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for child, (out, err) in zip(children, results):
        assert child.returncode == 0, err
        assert out.split() == ["right", "2"], (out, err)  # forward and backward kernels loaded

    files = kernel_files(directory)
    assert len(files) == 2 and all(KERNEL_FILE.fullmatch(f.name) for f in files)
    kernel = codegen.pointwise(_region, torch.randn(300), torch.randn(300))
    assert sorted(f.read_text() for f in files) == sorted([kernel.source, kernel.backward_source])
    assert_no_temporaries(directory)
