"""The `rewrite` command: listing passes, help, rewriting .pt2 files and state dicts,
inspecting files; and every kind of bad input exits with status 2 and one `error:` line,
writes nothing and leaves the input file byte-identical."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from rewrite import zoo
from rewrite import Pass, PassResult
from rewrite.cli import build_parser, main
from rewrite.pass_infra import format_value, pass_class
from rewrite.serialize import load, load_program
from helpers import WritesMarker

LLAMA_KWARGS = {"dim": 64, "depth": 1, "heads": 2, "max_seq": 32}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _call(argv: list[str]) -> tuple[int, str, str]:
    """main() in this process with stdout/stderr captured (for module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _op_names(gm) -> set[str]:
    return {
        n.target._schema.name.replace("::", ".")
        for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    }


def _random_bytes(n: int = 4096) -> bytes:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)).numpy().tobytes()


# -- inputs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_inputs")
    torch.manual_seed(0)
    mlp, inputs = zoo.build("mlp")
    torch.export.save(torch.export.export(mlp, inputs, strict=False), folder / "mlp.pt2")
    torch.save(mlp.state_dict(), folder / "mlp.pt")
    save_file(mlp.state_dict(), str(folder / "mlp.safetensors"))
    mlp32 = zoo.mlp(hidden=32)
    torch.save(mlp32.state_dict(), folder / "mlp32.pt")
    llama = zoo.llama(**LLAMA_KWARGS)
    torch.save(llama.state_dict(), folder / "llama.pt")
    return {"folder": folder, "mlp": mlp, "inputs": inputs, "mlp32": mlp32, "llama": llama}


def _copy(files, name: str, folder: Path) -> Path:
    return Path(shutil.copy(files["folder"] / name, folder / name))


# -- passes and help ------------------------------------------------------------------------


def test_passes_lists_approx_bp_with_its_options_and_their_docs(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    cls = pass_class("approx_bp")
    assert f"approx_bp: {cls.summary()}" in out
    assert cls.summary()
    for field in cls.options():
        doc = field.metadata["doc"]
        assert doc
        assert f"{field.name}={format_value(field.default)}  {doc}" in out
    assert "approx_bp{option=value" in out or "name{option=value" in out


def _run_subparser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["run"]


def test_run_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    actions = [a for a in _run_subparser()._actions if a.dest != "help"]
    assert {a.dest for a in actions} >= {
        "input", "passes", "output", "report", "model", "model_kwargs", "input_shape", "input_dtype",
        "int_high", "mode", "static_batch", "no_verify", "quiet", "data",
    }
    for action in actions:
        assert action.help and len(action.help) > 15, f"{action.dest} has no real help text"
        for flag in action.option_strings:
            assert flag in out, flag
        # argparse wraps lines; compare with whitespace collapsed
        assert " ".join(action.help.split())[:40] in flat, action.dest
    for field in pass_class("approx_bp").options():
        assert f"{field.name}={format_value(field.default)}" in flat


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


# -- run: successes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pt2_run(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pt2_run")
    source = _copy(files, "mlp.pt2", folder)
    digest = _sha256(source)
    rc, out, err = _call(["run", source, "-p", "approx_bp", "-o", folder / "out.pt2", "--report", folder / "r.html"])
    return {"rc": rc, "out": out, "err": err, "folder": folder, "source": source, "digest": digest}


def test_run_pt2_writes_the_rewritten_model_and_the_report(pt2_run, files):
    assert pt2_run["rc"] == 0, pt2_run["err"]
    folder = pt2_run["folder"]
    assert _listing(folder) == ["mlp.pt2", "out.pt2", "r.html"]  # no temporary files left
    assert _sha256(pt2_run["source"]) == pt2_run["digest"]
    rewritten = load(folder / "out.pt2")
    assert {"rewrite.regelu2", "rewrite.ms_layer_norm"} <= _op_names(rewritten)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(*files["inputs"]), files["mlp"](*files["inputs"]), rtol=1e-5, atol=1e-5)
    _, report = load_program(folder / "out.pt2")
    assert [p["name"] for p in report["passes"]] == ["approx_bp"]
    assert len(report["passes"][0]["changes"]) == 4


def test_run_pt2_prints_the_report_and_progress(pt2_run):
    assert "pass approx_bp" in pt2_run["out"] and "changed 4" in pt2_run["out"]
    assert "aten.gelu -> rewrite.regelu2" in pt2_run["out"]
    assert "loading" in pt2_run["err"] and "saving" in pt2_run["err"]
    assert "Traceback" not in pt2_run["err"]


def test_run_pt2_html_report_is_a_page_with_the_chart(pt2_run):
    page = (pt2_run["folder"] / "r.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page and "approx_bp" in page and "rewrite.regelu2" in page


def test_run_pt2_report_tells_the_truth_about_the_batch(pt2_run, files):
    # mlp.pt2 was exported with a static batch: the rewritten file is static too, and the
    # report must not claim otherwise.
    assert "dynamic batch: none" in pt2_run["out"]
    rewritten = load(pt2_run["folder"] / "out.pt2")
    with pytest.raises(Exception):
        rewritten(torch.randn(files["inputs"][0].shape[0] + 3, 64))


def test_run_state_dict_with_options(files, tmp_path, capsys):
    source = _copy(files, "mlp.pt", tmp_path)
    digest = _sha256(source)
    out_path = tmp_path / "out.pt2"
    rc = main(["run", str(source), "--model", "rewrite.zoo:mlp", "--input-shape", "4,64",
               "-p", "approx_bp{norms=false}", "-o", str(out_path), "-q"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""  # -q: no progress
    assert "pass approx_bp{norms=false}" in out
    assert _listing(tmp_path) == ["mlp.pt", "out.pt2"]
    assert _sha256(source) == digest
    rewritten = load(out_path)
    ops = _op_names(rewritten)
    assert "rewrite.regelu2" in ops
    assert "rewrite.ms_layer_norm" not in ops and "aten.layer_norm" in ops  # norms=false honoured
    assert rewritten.report["passes"][0]["options"]["norms"] is False
    x = torch.randn(9, 64)  # a state dict is captured with a dynamic batch
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), files["mlp"](x), rtol=1e-5, atol=1e-5)


def test_run_safetensors(files, tmp_path, capsys):
    source = _copy(files, "mlp.safetensors", tmp_path)
    digest = _sha256(source)
    rc = main(["run", str(source), "--model", "rewrite.zoo:mlp", "--input-shape", "4,64",
               "-p", "approx_bp{norms=false}", "-o", str(tmp_path / "out.pt2"), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert _listing(tmp_path) == ["mlp.safetensors", "out.pt2"]
    assert _sha256(source) == digest
    rewritten = load(tmp_path / "out.pt2")
    ops = _op_names(rewritten)
    assert "rewrite.regelu2" in ops and "rewrite.ms_layer_norm" not in ops
    with torch.no_grad():
        torch.testing.assert_close(rewritten(*files["inputs"]), files["mlp"](*files["inputs"]), rtol=1e-5, atol=1e-5)


def test_run_with_model_kwargs(files, tmp_path, capsys):
    source = _copy(files, "mlp32.pt", tmp_path)
    rc = main(["run", str(source), "--model", "rewrite.zoo:mlp", "--model-kwargs", '{"hidden": 32}',
               "--input-shape", "4,64", "-p", "approx_bp", "-o", str(tmp_path / "out.pt2"), "-q"])
    assert rc == 0, capsys.readouterr().err
    rewritten = load(tmp_path / "out.pt2")
    assert rewritten.get_parameter("head.weight").shape == (10, 32)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), files["mlp32"](x), rtol=1e-5, atol=1e-5)


def test_run_llama_with_integer_inputs(files, tmp_path, capsys):
    source = _copy(files, "llama.pt", tmp_path)
    rc = main(["run", str(source), "--model", "rewrite.zoo:llama", "--model-kwargs", json.dumps(LLAMA_KWARGS),
               "--input-shape", "2,16", "--input-dtype", "int64", "--int-high", "256",
               "-p", "approx_bp", "-o", str(tmp_path / "out.pt2"), "-q"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    program, report = load_program(tmp_path / "out.pt2")
    (name,) = program.graph_signature.user_inputs
    token_input = next(n for n in program.graph.nodes if n.name == name)
    assert token_input.meta["val"].dtype == torch.int64
    rewritten = load(tmp_path / "out.pt2")
    assert {"rewrite.resilu2", "rewrite.ms_rms_norm"} <= _op_names(rewritten)
    tokens = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(rewritten(tokens), files["llama"](tokens), rtol=1e-4, atol=1e-5)
    assert report["model"] == "LlamaDecoder"


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_rewritten_pt2(pt2_run, capsys):
    assert main(["inspect", str(pt2_run["folder"] / "out.pt2")]) == 0
    out = capsys.readouterr().out
    assert "torch.export program" in out
    assert "input  x: f32[4, 64]" in out and "output" in out
    assert "rewrite ops: rewrite.ms_layer_norm x2, rewrite.regelu2 x2" in out
    assert "approx_bp: 4 changed, 0 left alone, exact forward, approximate backward" in out
    assert "saved for backward" in out and "gradient error" in out
    assert "= rewrite.regelu2(" not in out  # no graph without --graph


def test_inspect_with_graph_prints_one_node_a_line(pt2_run, capsys):
    assert main(["inspect", str(pt2_run["folder"] / "out.pt2"), "--graph"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert sum("= rewrite.regelu2(" in line for line in lines) == 2
    assert sum("= rewrite.ms_layer_norm(" in line for line in lines) == 2
    assert any(line.startswith("return ") for line in lines)
    assert "x: f32[4, 64]" in lines


def test_inspect_plain_pt2_has_no_report(files, capsys):
    assert main(["inspect", str(files["folder"] / "mlp.pt2")]) == 0
    out = capsys.readouterr().out
    assert "torch.export program" in out and "aten.gelu" in out
    assert "rewrite ops" not in out and "rewritten from" not in out


@pytest.mark.parametrize("name", ["mlp.pt", "mlp.safetensors"])
def test_inspect_state_dict(files, capsys, name):
    path = files["folder"] / name
    digest = _sha256(path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    state = files["mlp"].state_dict()
    assert f"state dict, {len(state)} tensors, {sum(t.numel() for t in state.values()):,} values" in out
    assert "body.1.weight" in out and "f32[256, 64]" in out and "head.bias" in out
    assert _sha256(path) == digest


# -- bad input ---------------------------------------------------------------------------------


def _assert_refused(capsys, argv, folder: Path, mentions=(), untouched=()) -> str:
    """main(argv) exits 2 with one `error:` line that mentions each string, writes nothing into
    ``folder`` and leaves the files in ``untouched`` byte-identical."""
    listing = _listing(folder)
    digests = {Path(p): _sha256(p) for p in untouched}
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in mentions:
        assert str(text) in lines[0], f"{text!r} not in {lines[0]!r}"
    assert _listing(folder) == listing, "something was written"
    for path, digest in digests.items():
        assert _sha256(path) == digest, f"{path} was modified"
    return lines[0]


def test_missing_input_file(tmp_path, capsys):
    missing = tmp_path / "missing.pt2"
    _assert_refused(capsys, ["run", missing, "-p", "approx_bp", "-o", tmp_path / "out.pt2", "-q"], tmp_path,
                    mentions=[missing, "no such file"])


@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".safetensors"])
def test_corrupt_input_file(tmp_path, capsys, suffix):
    bad = tmp_path / f"corrupt{suffix}"
    bad.write_bytes(_random_bytes())
    model = [] if suffix == ".pt2" else ["--model", "rewrite.zoo:mlp", "--input-shape", "4,64"]
    message = _assert_refused(
        capsys, ["run", bad, *model, "-p", "approx_bp", "-o", tmp_path / "out.pt2", "--report", tmp_path / "r.html", "-q"],
        tmp_path, mentions=[bad], untouched=[bad],
    )
    assert "pickled" not in message  # random bytes are corrupt, not a pickle to refuse


def test_truncated_pt2_input(files, tmp_path, capsys):
    data = (files["folder"] / "mlp.pt2").read_bytes()
    bad = tmp_path / "truncated.pt2"
    bad.write_bytes(data[: len(data) // 3])
    _assert_refused(capsys, ["run", bad, "-p", "approx_bp", "-o", tmp_path / "out.pt2", "-q"], tmp_path,
                    mentions=[bad], untouched=[bad])


def test_pickled_object_is_refused_and_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"body.0.weight": torch.ones(64), "payload": WritesMarker(marker)}, evil)
    message = _assert_refused(
        capsys, ["run", evil, "--model", "rewrite.zoo:mlp", "--input-shape", "4,64", "-p", "approx_bp",
                 "-o", tmp_path / "out.pt2", "-q"],
        tmp_path, mentions=[evil, "state dict"], untouched=[evil],
    )
    assert "pickled" in message
    assert not marker.exists()
    _assert_refused(capsys, ["inspect", evil], tmp_path, mentions=[evil], untouched=[evil])
    assert not marker.exists()


@pytest.mark.parametrize(
    "spec,mentions",
    [
        ("remat_nonexistent", ["remat_nonexistent", "approx_bp"]),
        ("approx_bp{fold=true}", ["fold", "gelu", "silu", "norms"]),
        ("approx_bp{norms=maybe}", ["norms", "maybe", "bool"]),
        ("approx_bp{norms}", ["norms", "value"]),
        ("approx_bp{norms=false", ["approx_bp{norms=false"]),
    ],
)
def test_bad_pass_spec(files, tmp_path, capsys, spec, mentions):
    source = _copy(files, "mlp.pt2", tmp_path)
    _assert_refused(capsys, ["run", source, "-p", spec, "-o", tmp_path / "out.pt2", "-q"], tmp_path,
                    mentions=mentions, untouched=[source])


def test_state_dict_without_model(files, tmp_path, capsys):
    source = _copy(files, "mlp.safetensors", tmp_path)
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "-o", tmp_path / "out.pt2", "-q"], tmp_path,
                    mentions=[source, "--model"], untouched=[source])


@pytest.mark.parametrize(
    "model,extra,mentions",
    [
        ("cli_test_no_such_module:build", [], ["cli_test_no_such_module", "import"]),
        ("rewrite.zoo", [], ["rewrite.zoo", "package.module:factory"]),
        ("rewrite.zoo:BUILTIN", [], ["BUILTIN", "callable"]),
        ("rewrite.zoo:no_such_factory", [], ["no_such_factory"]),
        ("builtins:dict", [], ["dict", "not a torch.nn.Module"]),
        ("rewrite.zoo:build", [], ["rewrite.zoo:build", "calling it failed"]),
        ("rewrite.zoo:mlp", ["--model-kwargs", "{hidden: 32"], ["--model-kwargs", "JSON"]),
        ("rewrite.zoo:mlp", ["--model-kwargs", "[32]"], ["--model-kwargs", "object"]),
        ("rewrite.zoo:mlp", ["--model-kwargs", '{"widthh": 32}'], ["widthh"]),
    ],
)
def test_bad_model(files, tmp_path, capsys, model, extra, mentions):
    source = _copy(files, "mlp.pt", tmp_path)
    _assert_refused(
        capsys, ["run", source, "--model", model, *extra, "--input-shape", "4,64", "-p", "approx_bp",
                 "-o", tmp_path / "out.pt2", "-q"],
        tmp_path, mentions=mentions, untouched=[source],
    )


def test_state_dict_with_missing_and_unexpected_keys(files, tmp_path, capsys):
    state = dict(files["mlp"].state_dict())
    state["head.kernel"] = state.pop("head.weight")
    source = tmp_path / "renamed.pt"
    torch.save(state, source)
    _assert_refused(
        capsys, ["run", source, "--model", "rewrite.zoo:mlp", "--input-shape", "4,64", "-p", "approx_bp",
                 "-o", tmp_path / "out.pt2", "-q"],
        tmp_path, mentions=[source, "rewrite.zoo:mlp", "missing", "head.weight", "unexpected", "head.kernel"],
        untouched=[source],
    )


def test_state_dict_with_the_wrong_shapes(files, tmp_path, capsys):
    source = _copy(files, "mlp32.pt", tmp_path)  # hidden=32 weights, default (hidden=256) model
    _assert_refused(
        capsys, ["run", source, "--model", "rewrite.zoo:mlp", "--input-shape", "4,64", "-p", "approx_bp",
                 "-o", tmp_path / "out.pt2", "-q"],
        tmp_path, mentions=[source, "rewrite.zoo:mlp", "body.1.weight"], untouched=[source],
    )


def test_model_torch_export_cannot_capture(tmp_path, capsys, monkeypatch):
    (tmp_path / "cli_branchy_model.py").write_text(textwrap.dedent("""
        import torch

        class Branchy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(8, 8)

            def forward(self, x):
                if x.sum() > 0:
                    return self.fc(x)
                return -self.fc(x)

        def build():
            return Branchy()
    """))
    source = tmp_path / "branchy.pt"
    torch.save({"fc.weight": torch.randn(8, 8), "fc.bias": torch.randn(8)}, source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI may add the working folder
    monkeypatch.delitem(sys.modules, "cli_branchy_model", raising=False)
    try:
        message = _assert_refused(
            capsys, ["run", "branchy.pt", "--model", "cli_branchy_model:build", "--input-shape", "4,8",
                     "-p", "approx_bp", "-o", "out.pt2", "-q"],
            tmp_path, mentions=["Branchy", "data-dependent", "cli_branchy_model.py"], untouched=[source],
        )
    finally:
        sys.modules.pop("cli_branchy_model", None)
    assert "if x.sum() > 0" in message


@pytest.mark.parametrize(
    "output,mentions",
    [("out.pt", ["-o", "out.pt", ".pt2"]), ("out", ["-o", ".pt2"]), ("nodir/out.pt2", ["nodir", "does not exist"])],
)
def test_bad_output_path(files, tmp_path, capsys, output, mentions):
    source = _copy(files, "mlp.pt2", tmp_path)
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "-o", tmp_path / output, "-q"], tmp_path,
                    mentions=mentions, untouched=[source])
    assert not (tmp_path / "nodir").exists()


def test_output_equal_to_input(files, tmp_path, capsys):
    source = _copy(files, "mlp.pt2", tmp_path)
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "-o", source, "-q"], tmp_path,
                    mentions=["-o", "input"], untouched=[source])
    # the same file spelled differently
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "-o", f"{tmp_path}/../{tmp_path.name}/mlp.pt2", "-q"], tmp_path,
                    mentions=["input"], untouched=[source])


@pytest.mark.parametrize("report,mentions", [("r.txt", ["--report", "r.txt", ".html"]), ("r.pdf", ["--report"]),
                                             ("nodir/r.html", ["--report", "nodir"])])
def test_bad_report_path(files, tmp_path, capsys, report, mentions):
    source = _copy(files, "mlp.pt2", tmp_path)
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "-o", tmp_path / "out.pt2", "--report",
                             tmp_path / report, "-q"], tmp_path, mentions=mentions, untouched=[source])


@pytest.mark.parametrize(
    "args,mentions",
    [
        (["--input-shape", "4,abc"], ["--input-shape", "4,abc"]),
        (["--input-shape", "4,64", "--input-dtype", "float8"], ["--input-dtype", "float8"]),
        ([], ["--input-shape"]),
    ],
)
def test_bad_input_description(files, tmp_path, capsys, args, mentions):
    source = _copy(files, "mlp.pt", tmp_path)
    _assert_refused(capsys, ["run", source, "--model", "rewrite.zoo:mlp", *args, "-p", "approx_bp",
                             "-o", tmp_path / "out.pt2", "-q"], tmp_path, mentions=mentions, untouched=[source])


def test_pt2_with_model_option(files, tmp_path, capsys):
    source = _copy(files, "mlp.pt2", tmp_path)
    _assert_refused(capsys, ["run", source, "--model", "rewrite.zoo:mlp", "-p", "approx_bp", "-o",
                             tmp_path / "out.pt2", "-q"], tmp_path, mentions=["--model"], untouched=[source])


def test_unknown_input_type(tmp_path, capsys):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"onnx")
    for argv in (["run", source, "-p", "approx_bp", "-o", tmp_path / "out.pt2", "-q"], ["inspect", source]):
        _assert_refused(capsys, argv, tmp_path, mentions=[source, ".onnx"], untouched=[source])


@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".safetensors"])
def test_inspect_bad_files(tmp_path, capsys, suffix):
    bad = tmp_path / f"corrupt{suffix}"
    bad.write_bytes(_random_bytes())
    _assert_refused(capsys, ["inspect", bad], tmp_path, mentions=[bad], untouched=[bad])
    _assert_refused(capsys, ["inspect", tmp_path / f"missing{suffix}"], tmp_path, mentions=["missing", "no such file"])


def test_error_without_quiet_is_still_one_error_line(files, tmp_path, capsys):
    source = _copy(files, "mlp32.pt", tmp_path)
    rc = main(["run", str(source), "--model", "rewrite.zoo:mlp", "--input-shape", "4,64", "-p", "approx_bp",
               "-o", str(tmp_path / "out.pt2")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert all(line.startswith(("error: ", "[")) for line in err.splitlines() if line.strip())


# -- the real command --------------------------------------------------------------------------


def _subprocess(argv: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=300)


def _assert_one_error_line(proc: subprocess.CompletedProcess, *mentions) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in mentions:
        assert str(text) in lines[0]
    assert proc.stdout == ""


def test_console_script_exits_2_with_one_error_line(files, tmp_path):
    script = Path(sys.executable).parent / "rewrite"
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    source = _copy(files, "mlp32.pt", tmp_path)  # weights that do not fit the default mlp
    digest = _sha256(source)
    proc = _subprocess([script, "run", source, "--model", "rewrite.zoo:mlp", "--input-shape", "4,64",
                        "-p", "approx_bp", "-o", tmp_path / "out.pt2", "-q"], tmp_path)
    _assert_one_error_line(proc, source, "does not fit")
    assert _listing(tmp_path) == ["mlp32.pt"]
    assert _sha256(source) == digest


@pytest.mark.slow
def test_python_m_rewrite_exits_2_with_one_error_line(files, tmp_path):
    source = _copy(files, "mlp.pt2", tmp_path)
    digest = _sha256(source)
    proc = _subprocess([sys.executable, "-m", "rewrite", "run", source, "-p", "approx_bp{fold=true}",
                        "-o", tmp_path / "out.pt2", "-q"], tmp_path)
    _assert_one_error_line(proc, "fold", "norms")
    proc = _subprocess([sys.executable, "-m", "rewrite", "inspect", tmp_path / "missing.pt2"], tmp_path)
    _assert_one_error_line(proc, "missing.pt2")
    assert _listing(tmp_path) == ["mlp.pt2"]
    assert _sha256(source) == digest


# -- inspect --kernels -------------------------------------------------------------------------


def _example_pass(script: str, class_name: str):
    """A pass defined by one of the examples, without leaving it registered by name."""
    import importlib.util

    from rewrite import pass_infra

    registered = dict(pass_infra._registered)
    spec = importlib.util.spec_from_file_location(f"example_{Path(script).stem}", Path(__file__).parents[2] / "examples" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pass_infra._registered.clear()
    pass_infra._registered.update(registered)
    return module, getattr(module, class_name)()


@pytest.fixture(scope="module")
def pointwise_pt2(tmp_path_factory):
    """A saved model whose bias + GELU + scale + residual chain is one rewrite.pointwise op."""
    from rewrite import optimize, save

    torch.manual_seed(0)
    module, fuse = _example_pass("fuse_pointwise.py", "FusePointwise")
    model = module.Block(dim=16)
    rewritten = optimize(model, [fuse], (torch.randn(4, 16),), codegen=True)
    assert "rewrite.pointwise" in _op_names(rewritten)
    return save(rewritten, tmp_path_factory.mktemp("pointwise") / "pointwise.pt2")


def _assert_kernels_printed(path: Path, out: str) -> None:
    """Every rewrite op of the file is listed: its region, as comment lines, and the whole
    source of each of its kernels, which is Triton Python."""
    from rewrite.kernel_listing import kernel_listings

    program, _ = load_program(path)
    listings = kernel_listings(program.graph)
    assert listings
    for listing in listings:
        assert f"# {listing.op} at node {listing.node}" in out
        for line in listing.region.splitlines():
            assert f"# {line}" in out, line
        for kind, source in listing.sources.items():
            assert f"# ---- {kind} kernel ----\n{source}" in out, (listing.node, kind)
            assert "@triton.jit" in source
            compile(source, f"{listing.node}_{kind}", "exec")
    assert out.count("@triton.jit") == sum(len(k.sources) for k in listings)


def test_inspect_kernels_prints_the_approx_bp_kernels(pt2_run, capsys):
    path = pt2_run["folder"] / "out.pt2"
    assert main(["inspect", str(path), "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "rewrite ops: rewrite.ms_layer_norm x2, rewrite.regelu2 x2" in out  # the summary is still there
    assert out.count("# rewrite.regelu2 at node") == 2 and out.count("# rewrite.ms_layer_norm at node") == 2
    assert "def packed2_forward(" in out and "def packed2_backward(" in out
    assert "def ms_layer_norm_forward(" in out and "def ms_layer_norm_backward(" in out
    _assert_kernels_printed(path, out)


def test_inspect_kernels_prints_the_pointwise_region_and_its_kernels(pointwise_pt2, capsys):
    assert main(["inspect", str(pointwise_pt2), "--kernels"]) == 0
    out = capsys.readouterr().out
    assert out.count("# rewrite.pointwise at node") == 1
    assert "aten.gelu.default(" in out and "aten.mul.Tensor(" in out
    assert "def pointwise_forward(" in out and "def pointwise_backward(" in out
    _assert_kernels_printed(pointwise_pt2, out)


def test_inspect_kernels_of_a_program_without_rewrite_ops(files, capsys):
    assert main(["inspect", str(files["folder"] / "mlp.pt2"), "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "no rewrite ops with emitted kernels" in out and "@triton.jit" not in out


@pytest.mark.parametrize("name", ["mlp.safetensors", "mlp.pt"])
def test_inspect_kernels_of_a_state_dict_is_refused(files, tmp_path, capsys, name):
    source = _copy(files, name, tmp_path)
    _assert_refused(capsys, ["inspect", source, "--kernels"], tmp_path, mentions=[source, "--kernels", ".pt2"],
                    untouched=[source])


# -- hostile and careless input (each of these printed a traceback or worse) ----------------------


def test_output_that_is_a_folder(files, tmp_path, capsys):
    source = _copy(files, "mlp.pt2", tmp_path)
    (tmp_path / "out.pt2").mkdir()
    (tmp_path / "r.html").mkdir()
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "-o", tmp_path / "out.pt2", "-q"], tmp_path,
                    mentions=["-o", "out.pt2", "folder"], untouched=[source])
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "-o", tmp_path / "o.pt2", "--report", tmp_path / "r.html",
                             "-q"], tmp_path, mentions=["--report", "folder"], untouched=[source])


def test_output_that_cannot_be_written(files, tmp_path, capsys):
    source = _copy(files, "mlp.pt2", tmp_path)
    # /proc refuses new files even to root; the check before the rewrite cannot see that, the write does.
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "-o", "/proc/out.pt2", "-q"], tmp_path,
                    mentions=["/proc/out.pt2", "cannot write"], untouched=[source])


def test_full_disk_leaves_no_model_no_report_and_no_temporary_files(files, tmp_path, capsys, monkeypatch):
    source = _copy(files, "mlp.pt2", tmp_path)
    old = tmp_path / "out.pt2"
    old.write_bytes(b"the user's old model")

    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", fsync)
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "-o", old, "--report", tmp_path / "r.html", "-q"],
                    tmp_path, mentions=["No space left"], untouched=[source, old])


@pytest.mark.parametrize(
    "args,mentions",
    [
        (["--input-shape", "0,64"], ["--input-shape", "0,64", "at least 1"]),
        (["--input-shape", "4,-64"], ["--input-shape", "4,-64"]),
        (["--input-shape", "4,,64"], ["--input-shape", "4,,64"]),
        (["--input-shape", "100000000,100000000"], ["--input-shape", "GiB"]),
        (["--input-shape", "99999999999999999999999999,64"], ["--input-shape", "GiB"]),
        (["--input-shape", "4,64", "--input-dtype", "int64", "--int-high", "0"], ["--int-high", "at least 1"]),
        (["--input-shape", "4,64", "--input-dtype", "int32", "--int-high", "99999999999"], ["--int-high", "int32"]),
        # the model cannot take these: torch.export fails on the first, traces the second
        (["--input-shape", "4,64", "--input-dtype", "int64"], ["MLP itself fails", "i64[4, 64]", "accepts"]),
        (["--input-shape", "4,64", "--input-dtype", "float64"], ["MLP itself fails", "f64[4, 64]", "accepts"]),
        (["--input-shape", "4,32"], ["MLP itself fails", "f32[4, 32]"]),
    ],
)
def test_input_shapes_and_ranges_that_cannot_be(files, tmp_path, capsys, args, mentions):
    source = _copy(files, "mlp.pt", tmp_path)
    _assert_refused(capsys, ["run", source, "--model", "rewrite.zoo:mlp", *args, "-p", "approx_bp",
                             "-o", tmp_path / "out.pt2", "-q"], tmp_path, mentions=mentions, untouched=[source])


@pytest.mark.parametrize(
    "module_text,model,mentions",
    [
        (None, ":mlp", [":mlp", "package.module:factory"]),
        (None, "..x:mlp", ["..x:mlp", "package.module:factory"]),
        (None, "some/file.py:mlp", ["package.module:factory"]),
        ("def build(:\n", "cli_broken_syntax:build", ["cli_broken_syntax", "syntax error", "line 1"]),
        ("raise RuntimeError('boom at import')\n", "cli_raises_on_import:build", ["cli_raises_on_import", "boom at import"]),
        ("import sys\nsys.exit(0)\n", "cli_exits_on_import:build", ["cli_exits_on_import", "SystemExit"]),
        ("import sys\ndef build():\n    sys.exit(0)\n", "cli_exits_when_called:build", ["calling it failed", "SystemExit"]),
    ],
)
def test_model_specs_that_cannot_be_imported(files, tmp_path, capsys, monkeypatch, module_text, model, mentions):
    source = _copy(files, "mlp.pt", tmp_path)
    if module_text is not None:
        module_dir = tmp_path / "modules"
        module_dir.mkdir()
        (module_dir / f"{model.split(':')[0]}.py").write_text(module_text)
        monkeypatch.syspath_prepend(str(module_dir))
    _assert_refused(capsys, ["run", source, "--model", model, "--input-shape", "4,64", "-p", "approx_bp",
                             "-o", tmp_path / "out.pt2", "-q"], tmp_path, mentions=mentions, untouched=[source])


def test_input_shape_that_does_not_fit_the_saved_program(files, tmp_path, capsys):
    source = _copy(files, "mlp.pt2", tmp_path)
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "--input-shape", "4,3", "-o", tmp_path / "out.pt2", "-q"],
                    tmp_path, mentions=["--input-shape", "f32[4, 3]", "64"], untouched=[source])
    _assert_refused(capsys, ["run", source, "-p", "approx_bp", "--input-shape", "4,64", "--input-shape", "4,64",
                             "-o", tmp_path / "out.pt2", "-q"], tmp_path, mentions=["2 positional", "takes 1"],
                    untouched=[source])


def _with_parts(source: Path, out: Path, replace: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(out, "w") as rewritten:
        for name in archive.namelist():
            inner = name.split("/", 1)[1]
            rewritten.writestr(name, replace.get(inner, archive.read(name)))
    return out


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "sample,mentions",
    [
        (((torch.randn(4, 64), torch.randn(4, 64)), {}), ["2 positional", "takes 1"]),
        (((), {"zzz": torch.randn(4, 64)}), ["zzz"]),
        (((torch.randn(4, 3),), {}), ["f32[4, 3]"]),
        ((("text",), {}), ["str"]),
    ],
    ids=["too many", "unknown keyword", "wrong shape", "not a tensor"],
)
def test_saved_example_inputs_that_do_not_fit_the_program(files, tmp_path, capsys, sample, mentions):
    bad = _with_parts(files["folder"] / "mlp.pt2", tmp_path / "bad.pt2", {"data/sample_inputs/model.pt": _saved(sample)})
    _assert_refused(capsys, ["run", bad, "-p", "approx_bp", "-o", tmp_path / "out.pt2", "-q"], tmp_path,
                    mentions=[bad, "example inputs", *mentions], untouched=[bad])


@pytest.mark.parametrize(
    "report,mentions",
    [
        (b"{not json", ["not valid JSON"]),
        (b"[1, 2]", ["not a rewrite report"]),
        (b'{"model": "x"}', ["not a rewrite report"]),
        (b'{"passes": [3]}', ["not a rewrite report"]),
    ],
)
def test_saved_report_that_is_not_a_report(pt2_run, tmp_path, capsys, report, mentions):
    bad = _with_parts(pt2_run["folder"] / "out.pt2", tmp_path / "bad.pt2", {"extra/rewrite_report.json": report})
    for argv in (["inspect", bad], ["run", bad, "-p", "approx_bp", "-o", tmp_path / "out.pt2", "-q"]):
        _assert_refused(capsys, argv, tmp_path, mentions=[bad, "rewrite_report.json", *mentions], untouched=[bad])


def test_inspect_reads_a_report_with_odd_figures_without_failing(pt2_run, tmp_path, capsys):
    report = {"passes": [{"spec": "approx_bp", "changes": 5, "skipped": "x",
                          "numerics": {"activation_bytes_before": "lots", "grad_rel_error": [1]}}]}
    odd = _with_parts(pt2_run["folder"] / "out.pt2", tmp_path / "odd.pt2", {"extra/rewrite_report.json": json.dumps(report).encode()})
    assert main(["inspect", str(odd)]) == 0
    assert "approx_bp: 0 changed" in capsys.readouterr().out


def test_inspect_says_what_the_check_did_not_test_and_what_the_eager_model_saves(pt2_run, tmp_path, capsys):
    report = {
        "model": "Net", "mode": "train", "activation_bytes_eager": 2048, "fixed_mode": "in eval mode it differs",
        "passes": [{"spec": "approx_bp", "kind": "exact", "numerics": {"grad_untested": "no output needs a gradient"}}],
    }
    path = _with_parts(pt2_run["folder"] / "out.pt2", tmp_path / "r.pt2", {"extra/rewrite_report.json": json.dumps(report).encode()})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gradients NOT TESTED (no output needs a gradient)" in out
    assert "Net run eagerly saves 2.0 KiB for backward" in out
    assert "stays in train mode: in eval mode it differs" in out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_inspect_an_empty_state_dict(tmp_path, capsys, suffix):
    path = tmp_path / f"empty{suffix}"
    torch.save({}, path) if suffix == ".pt" else save_file({}, str(path))
    assert main(["inspect", str(path)]) == 0
    assert "0 tensors" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_raw_pickle_prints_the_error_alone(tmp_path, capfd):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps(WritesMarker(marker), protocol=4))
    assert main(["inspect", str(path)]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # torch's protocol warning is not printed
    assert "pickled Python objects" in err and "weights_only=False" not in err
    assert not marker.exists()


# -- fuzzing: whatever the arguments, an answer or one error line, never a traceback ---------------

_SHAPES = st.one_of(st.sampled_from(["4,64", "0,64", "4x64", "-1", "", ",", "99999999999999999999,1", "4,64,"]),
                    st.text(alphabet="0123456789,x- ", max_size=14))
_SPECS = st.one_of(
    st.sampled_from(["approx_bp", "remat", "approx_bp{norms=false}", "remat{budget=0.5}", "remat{budget=nan}",
                     "remat{intervals=1000000}", "remat{budget=inf}", "approx_bp{gelu=1,gelu=0}", "{}", "remat{"]),
    st.text(alphabet=st.sampled_from("abcdeprmtx_{}=,.0123456789 -"), max_size=24),
)


@pytest.fixture(scope="module")
def fuzz_inputs(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("mlp.pt", "mlp.pt2", "mlp.safetensors"):
        _copy(files, name, folder)
    (folder / "corrupt.pt2").write_bytes(_random_bytes(512))
    (folder / "a_folder.pt2").mkdir()
    return folder


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    command=st.sampled_from(["run", "inspect"]),
    source=st.sampled_from(["mlp.pt", "mlp.pt2", "mlp.safetensors", "corrupt.pt2", "a_folder.pt2", "missing.pt"]),
    specs=st.lists(_SPECS, max_size=2),
    output=st.sampled_from(["out.pt2", "out.txt", "a_folder.pt2", "/proc/out.pt2", "", "nodir/out.pt2"]),
    shapes=st.lists(_SHAPES, max_size=2),
    dtype=st.sampled_from([None, "float32", "int64", "bool", "float8", ""]),
    int_high=st.sampled_from([None, "0", "-3", "7", "99999999999999999999", "x"]),
    model=st.sampled_from([None, "rewrite.zoo:mlp", ":mlp", "..x:mlp", "rewrite.zoo", "os:system", "a b:c"]),
    extra=st.lists(st.sampled_from(["--no-verify", "--static-batch", "--mode", "eval", "--graph", "--kernels",
                                    "--codegen", "on", "--report", "r.html", "--model-kwargs", "{"]), max_size=3),
)
def test_fuzzed_command_lines_never_give_a_traceback(fuzz_inputs, command, source, specs, output, shapes, dtype,
                                                     int_high, model, extra):
    work = Path(tempfile.mkdtemp(dir=fuzz_inputs))
    argv = [command, str(fuzz_inputs / source)]
    if command == "run":
        argv += [a for spec in specs for a in ("-p", spec)]
        argv += ["-o", str(work / output) if output and not output.startswith("/") else output]
        argv += [a for shape in shapes for a in ("--input-shape", shape)]
        argv += ["--input-dtype", dtype] if dtype is not None else []
        argv += ["--int-high", int_high] if int_high is not None else []
        argv += ["--model", model] if model else []
    argv += [str(work / a) if a == "r.html" else a for a in extra] + ["-q"] * (command == "run")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exit:  # argparse's own usage errors
            rc = exit.code
    text = err.getvalue()
    assert rc in (0, 2), (argv, text)
    assert "Traceback" not in text, (argv, text)
    if rc == 2:
        assert any(line.startswith("error: ") or ": error: " in line for line in text.splitlines()), (argv, text)


@pytest.mark.parametrize(
    "args,mentions",
    [(["--batch", "-1"], ["--batch", "-1"]), (["--batch", "0"], ["--batch"]), (["--batch", "10000000000"], ["--batch"]),
     (["--out", "a_file"], ["--out", "a_file", "is a file"])],
)
def test_demo_options_that_cannot_be(tmp_path, capsys, monkeypatch, args, mentions):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("the user's")
    _assert_refused(capsys, ["demo", "--model", "mlp", *args], tmp_path, mentions=mentions, untouched=[tmp_path / "a_file"])


def test_a_failed_demo_leaves_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--model", "mlp", "-p", "remat{budget=1e-9}", "--out", "dd"]) == 2
    assert not (tmp_path / "dd").exists()


def test_inspect_json_prints_the_saved_report_as_numbers(pt2_run, files, tmp_path, capsys):
    assert main(["inspect", str(pt2_run["folder"] / "out.pt2"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (entry,) = report["passes"]
    numerics = entry["numerics"]
    assert entry["spec"] == "approx_bp" and len(entry["changes"]) > 0
    assert isinstance(numerics["activation_bytes_before"], int) and numerics["activation_bytes_after"] < numerics["activation_bytes_before"]
    assert 0 < numerics["grad_rel_error"] < 1 and isinstance(report["activation_bytes_eager"], int)
    _assert_refused(capsys, ["inspect", files["folder"] / "mlp.pt2", "--json"], files["folder"], mentions=["no rewrite report"])
    source = _copy(files, "mlp.pt", tmp_path)
    _assert_refused(capsys, ["inspect", source, "--json"], tmp_path, mentions=["--json"], untouched=[source])


@pytest.fixture()
def data_pass():
    from rewrite.pass_infra import _registered, register_pass

    @register_pass
    @dataclass(frozen=True)
    class CountsBatches(Pass):
        """Learns nothing: counts the batches it is given (a stand-in for a pass that trains)."""

        name: ClassVar[str] = "counts_batches"
        needs_data: ClassVar[bool] = True

        def run(self, gm, ctx):
            return PassResult(figures={"batches": len(list(ctx.data)), "eval_batches": len(list(ctx.eval_data or []))})

    yield CountsBatches
    _registered.pop("counts_batches")


def test_data_from_a_factory_reaches_the_pass(files, tmp_path, capsys, monkeypatch, data_pass):
    (tmp_path / "cli_batches.py").write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def both():
            x = torch.randn(96, 64)
            return DataLoader(TensorDataset(x), batch_size=32), DataLoader(TensorDataset(x[:32]), batch_size=32)

        def nothing():
            return None
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    source = _copy(files, "mlp.pt2", tmp_path)
    assert main(["run", str(source), "-p", "counts_batches", "--data", "cli_batches:both", "-o", str(tmp_path / "o.pt2"),
                 "-q"]) == 0
    assert "batches: 3" in capsys.readouterr().out
    (tmp_path / "o.pt2").unlink()
    _assert_refused(capsys, ["run", source, "-p", "counts_batches", "-o", tmp_path / "o.pt2", "-q"], tmp_path,
                    mentions=["counts_batches", "learns from data", "--data"], untouched=[source])
    _assert_refused(capsys, ["run", source, "-p", "counts_batches", "--data", "cli_batches:nothing", "-o",
                             tmp_path / "o.pt2", "-q"], tmp_path, mentions=["--data", "None"], untouched=[source])
    _assert_refused(capsys, ["run", source, "-p", "counts_batches", "--data", "data.pt", "-o", tmp_path / "o.pt2", "-q"],
                    tmp_path, mentions=["--data", "package.module:factory"], untouched=[source])
