"""codegen.cache: emitted kernels as <sha256>.py files, memoised in the process, repaired when
damaged, shared safely by concurrent processes; run from their checked text (never from bytecode
or a file changed later), in a directory no other user can change."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import py_compile
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import codegen
import rewrite  # noqa: F401 - registers torch.ops.rewrite.pointwise
from codegen import cache
from rewrite import errors, zoo
from rewrite.api import optimize
from rewrite.cli import main

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


@pytest.mark.slow
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


# ---- what runs is the checked text -----------------------------------------------------------------

MODULE_SOURCE = textwrap.dedent(
    """
    import triton
    import triton.language as tl


    def answer():
        return 1


    @triton.jit
    def fill(out_ptr):
        tl.store(out_ptr, 1.0)
    """
)


def payload(directory: Path, marker: Path) -> Path:
    """A module whose only effect is to create ``marker``."""
    path = directory / "payload.py"
    path.write_text(f"open({str(marker)!r}, 'w').close()\n")
    return path


@pytest.mark.parametrize("invalidation", ["timestamp", "unchecked_hash"])
def test_planted_bytecode_never_runs(kernel_dir, tmp_path_factory, invalidation):
    module = cache.load(MODULE_SOURCE)
    path = Path(module.__file__)
    elsewhere = tmp_path_factory.mktemp("payload")
    marker = elsewhere / "payload_ran"
    planted = payload(elsewhere, marker)
    if invalidation == "timestamp":  # same size and mtime as the kernel file: the header matches it
        text = planted.read_text()
        planted.write_text(text + "#" * (path.stat().st_size - len(text) - 1) + "\n")
        os.utime(planted, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
        mode = py_compile.PycInvalidationMode.TIMESTAMP
    else:
        mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
    py_compile.compile(str(planted), cfile=importlib.util.cache_from_source(str(path)), invalidation_mode=mode,
                       doraise=True)  # fmt: skip

    cache.clear_memory()
    module = cache.load(MODULE_SOURCE)
    assert not marker.exists(), "the planted .pyc ran"
    assert module.answer() == 1


def test_no_bytecode_is_written(kernel_dir, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    cache.load(MODULE_SOURCE)
    assert [p for p in kernel_dir.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"] == []


def test_inspect_and_triton_see_the_checked_text_after_the_file_is_swapped(kernel_dir):
    module = cache.load(MODULE_SOURCE)
    path = Path(module.__file__)
    path.write_text(MODULE_SOURCE.replace("return 1", "return 2  # swapped").replace("1.0", "2.0 + 0.0"))

    assert inspect.getsource(module.answer) == "def answer():\n    return 1\n"
    assert "tl.store(out_ptr, 1.0)" in inspect.getsource(module.fill.fn)
    out = torch.zeros(1)
    module.fill[(1,)](out)  # the interpreter reads the kernel's source again when it launches it
    assert out.item() == 1.0


# ---- a directory no other user can change ----------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def using_cache_dir(directory: Path):
    cache.set_cache_dir(directory)
    cache.clear_memory()
    try:
        yield directory
    finally:
        cache.set_cache_dir(None)
        cache.clear_memory()


def test_directory_and_files_are_owner_only(tmp_path):
    directory = tmp_path / "new" / "kernels"
    with using_cache_dir(directory):
        cache.load("VALUE = 1\n")
    assert mode_of(tmp_path / "new") == mode_of(directory) == 0o700
    assert [mode_of(p) for p in kernel_files(directory)] == [0o600]


def refused(directory: Path, *needles: str) -> None:
    with using_cache_dir(directory), pytest.raises(cache.KernelCacheError) as caught:
        cache.load("VALUE = 1\n")
    message = str(caught.value)
    assert str(directory) in message and all(n in message for n in needles), message
    assert not directory.is_dir() or kernel_files(directory) == []


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777], ids=oct)
def test_directory_others_can_write_is_refused(tmp_path, mode):
    directory = tmp_path / "kernels"
    directory.mkdir()
    directory.chmod(mode)
    refused(directory, "writable by other users", f"chmod 700 {directory}")


def test_parent_others_can_write_is_refused_unless_sticky(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o777)
    refused(parent / "kernels", str(parent), "REWRITE_KERNEL_CACHE")

    parent.chmod(0o1777)  # like /tmp: others cannot rename or remove what is ours
    with using_cache_dir(parent / "kernels"):
        assert cache.load("VALUE = 1\n").VALUE == 1


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")


@needs_root
def test_directory_of_another_user_is_refused(tmp_path):
    directory = tmp_path / "kernels"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    refused(directory, "uid 65534", "REWRITE_KERNEL_CACHE")


@needs_root
def test_parent_of_another_user_is_refused(tmp_path):
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, 65534, 65534)
    refused(parent / "kernels", str(parent), "uid 65534")


def test_a_path_that_cannot_be_a_directory_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    refused(tmp_path / "file", "not a directory")
    refused(tmp_path / "file" / "kernels", "REWRITE_KERNEL_CACHE")


# ---- what the user sees ----------------------------------------------------------------------------


@pytest.fixture
def open_cache_dir(tmp_path):
    """A cache directory every user can write to, used for the kernels from now on."""
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)
    with using_cache_dir(directory):
        yield directory


def assert_names_the_directory(message: str, directory: Path) -> None:
    assert f"kernel cache directory {directory}" in message and f"chmod 700 {directory}" in message, message
    assert "approx_bp" not in message and "example inputs" not in message, message


def test_optimize_names_the_cache_directory(open_cache_dir):
    model, inputs = zoo.build("vit")
    with codegen.use_triton_on_cpu(), pytest.raises(errors.KernelCacheError) as caught:
        optimize(model, passes=["approx_bp"], example_inputs=inputs, codegen=True)
    assert_names_the_directory(str(caught.value), open_cache_dir)


def test_cli_names_the_cache_directory(open_cache_dir, tmp_path, capsys):
    model, inputs = zoo.build("vit")
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    argv = ["run", str(tmp_path / "vit.pt"), "--model", "rewrite.zoo:vit", "--input-shape",
            ",".join(map(str, inputs[0].shape)), "-p", "approx_bp", "--codegen", "on", "-o", str(tmp_path / "out.pt2"),
            "-q"]  # fmt: skip
    with codegen.use_triton_on_cpu():  # kernels run as they would on a GPU
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert_names_the_directory(err, open_cache_dir)
    assert not (tmp_path / "out.pt2").exists()
