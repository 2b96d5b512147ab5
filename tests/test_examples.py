"""The examples and the demo run as a user would run them."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rewrite.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_quickstart_trains_saves_and_reloads():
    out = _run("quickstart.py")
    assert "pass approx_bp" in out and "step 2: loss" in out
    assert "outputs equal: True" in out


@pytest.mark.slow
def test_custom_pass_example_fuses_hand_written_swish_then_approx_bp():
    out = _run("custom_pass.py")
    assert "x * sigmoid(x) -> aten.silu" in out
    assert "aten.silu -> rewrite.resilu2" in out


@pytest.mark.slow
def test_fuse_pointwise_example_compiles_its_region():
    out = _run("fuse_pointwise.py")
    assert "marked for codegen" in out and "-> rewrite.pointwise" in out
    assert "torch.ops.rewrite.pointwise.default" in out  # the rewritten graph calls the fused op
    assert "@triton.jit" in out and "def pointwise_forward" in out


@pytest.mark.slow
def test_remat_example_trains_in_half_the_activation_memory_with_equal_weights():
    out = _run("remat_training.py")
    assert "pass remat" in out and "solver: moccasin" in out
    # budget=0.5 is of the activation memory (of="activations"): the report's simulated peaks
    before, after = (float(re.search(rf"activation peak {when}: ([0-9.]+) MiB", out).group(1)) for when in ("before", "after"))
    assert after <= 0.5 * before + 0.05  # printed to 0.1 MiB
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all(line.endswith("weights equal: True") for line in lines)
    for line in lines:  # "step i: peak A MiB with remat, B MiB without; ..."
        with_remat = float(line.split("peak ")[1].split(" MiB")[0])
        without = float(line.split("remat, ")[1].split(" MiB")[0])
        # the whole step's measured peak: the gradients alive at the activations' peak come on top
        assert with_remat <= 0.6 * without


@pytest.mark.parametrize("model", ["mlp", "llama"])
def test_demo(tmp_path, capsys, model):
    assert main(["demo", "--model", model, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== graph before -> after" in out and "== report ==" in out
    assert "reloaded: outputs equal" in out
    assert (tmp_path / f"{model}.pt2").is_file() and (tmp_path / "report.html").is_file()
