"""Reports: the text diff of graphs, the Report object (text and JSON), and the HTML page
(self-contained, with the memory chart, the changes table and the side-by-side diff), checked
as text and, where Chromium is installed, rendered in a headless browser."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from rewrite import optimize, zoo
from rewrite.diff import diff_rows, graph_diff, graph_lines
from rewrite.html_report import _chart_rows, memory_chart_svg, render_html, write_html
from rewrite.pass_infra import PassResult
from rewrite.report import PassReport, Report, format_bytes
from rewrite.verify import Numerics, TensorError

aten = torch.ops.aten
SCREENSHOT_COPY = Path("/tmp/report_screenshot.png")
AFTER_BLUE = (0x2F, 0x6F, 0xDF)
BEFORE_GREY = (0x9A, 0xA3, 0xB5)
HEADER_DARK = (0x1D, 0x23, 0x30)


# -- small hand-made graphs -------------------------------------------------------------------


def make_graph(nodes: list[tuple[str, object, tuple[str, ...]]], output: str, *, assertion: bool = True) -> fx.GraphModule:
    """x -> nodes (name, aten op, argument names) -> output; reads the parameter `weight`
    through a get_attr node and checks x with an _assert_tensor_metadata node."""
    graph = fx.Graph()
    env = {"x": graph.placeholder("x"), "weight": graph.get_attr("weight")}
    if assertion:
        graph.call_function(aten._assert_tensor_metadata.default, (env["x"],), {"dtype": torch.float32})
    for name, op, args in nodes:
        node = graph.call_function(op, tuple(env[a] for a in args))
        node.name = name
        env[name] = node
    graph.output((env[output],))
    root = nn.Module()
    root.weight = nn.Parameter(torch.ones(3))
    return fx.GraphModule(root, graph)


BASE = [("mul", aten.mul.Tensor, ("x", "weight")), ("relu", aten.relu.default, ("mul",))]
WITH_EXTRA = [("mul", aten.mul.Tensor, ("x", "weight")), ("sin", aten.sin.default, ("x",)), ("relu", aten.relu.default, ("mul",))]
REPLACED = [("mul", aten.mul.Tensor, ("x", "weight")), ("gelu", aten.gelu.default, ("mul",))]


# -- real rewrites ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_rewrite():
    torch.manual_seed(0)
    model, inputs = zoo.build("mlp")
    return optimize(model, ["approx_bp"], inputs)


@pytest.fixture(scope="module")
def vit_rewrite():
    torch.manual_seed(0)
    model, inputs = zoo.build("vit")
    return optimize(model, ["approx_bp"], inputs)


@pytest.fixture(scope="module")
def vit_page(vit_rewrite):
    return render_html(vit_rewrite.report)


# -- diff --------------------------------------------------------------------------------------


def test_graph_lines_hide_get_attr_and_assertion_nodes():
    gm = make_graph(BASE, "relu")
    assert {n.op for n in gm.graph.nodes} >= {"get_attr"}
    assert any(n.target is aten._assert_tensor_metadata.default for n in gm.graph.nodes)
    lines = graph_lines(gm)
    assert len(lines) == 4  # x, mul, relu, return: the get_attr and the assertion are left out
    assert lines[0] == "x"  # an input without shape information: its name alone
    assert lines[1] == "mul = aten.mul.Tensor(x, weight)"  # the parameter appears by name where it is read
    assert lines[2] == "relu = aten.relu(mul)"
    assert lines[3] == "return (relu,)"
    assert not any("assert" in line or "get_attr" in line for line in lines)


def test_graph_lines_of_a_captured_graph_show_shapes_and_modules(mlp_rewrite):
    lines = graph_lines(mlp_rewrite.before)
    assert lines[0] == "x: f32[s77, 64]" or re.fullmatch(r"x: f32\[s\d+, 64\]", lines[0])
    gelu = next(line for line in lines if "aten.gelu(" in line)
    assert re.search(r"-> f32\[s\d+, 256\]\s+# body\.2$", gelu), gelu
    assert lines[-1].startswith("return ")
    hidden = [n for n in mlp_rewrite.before.graph.nodes if n.op in ("get_attr", "call_module")]  # params, guards
    assert len(lines) == len(mlp_rewrite.before.graph.nodes) - len(hidden) - sum(
        n.target is aten._assert_tensor_metadata.default for n in mlp_rewrite.before.graph.nodes
    )


def test_graph_diff_marks_removed_and_added_nodes(mlp_rewrite):
    text = graph_diff(mlp_rewrite.before, mlp_rewrite.after)
    lines = text.splitlines()
    assert lines[0] == "--- before" and lines[1] == "+++ after"
    removed = [line for line in lines[2:] if line.startswith("-")]
    added = [line for line in lines[2:] if line.startswith("+")]
    assert sum("= aten.gelu(" in line for line in removed) == 2
    assert sum("= aten.layer_norm(" in line for line in removed) == 2
    assert sum("= rewrite.regelu2(" in line for line in added) == 2
    assert sum("= rewrite.ms_layer_norm(" in line for line in added) == 2
    assert not any("rewrite." in line for line in removed)
    assert not any("aten.gelu(" in line or "aten.layer_norm(" in line for line in added)
    assert all(line[:1] in "-+ @" for line in lines[2:])


def test_graph_diff_of_insertions_and_deletions():
    base, extra = make_graph(BASE, "relu"), make_graph(WITH_EXTRA, "relu")
    inserted = graph_diff(base, extra, context=0).splitlines()
    assert [line for line in inserted[2:] if not line.startswith("@@")] == ["+sin = aten.sin(x)"]
    deleted = graph_diff(extra, base, context=0).splitlines()
    assert [line for line in deleted[2:] if not line.startswith("@@")] == ["-sin = aten.sin(x)"]


def test_graph_diff_context(mlp_rewrite):
    before, after = mlp_rewrite.before, mlp_rewrite.after
    full = graph_diff(before, after, context=None).splitlines()[2:]
    kept = [line for line in full if line[:1] in " -"]
    assert [line[1:] for line in kept] == graph_lines(before)  # every line of before appears
    none = graph_diff(before, after, context=0).splitlines()[2:]
    assert not any(line.startswith(" ") for line in none)
    assert len(none) < len(full)


def test_graph_diff_says_when_graphs_are_equal(mlp_rewrite):
    assert graph_diff(mlp_rewrite.before, mlp_rewrite.before) == "(the graphs are the same)"
    assert graph_diff(make_graph(BASE, "relu"), make_graph(BASE, "relu", assertion=False)) == "(the graphs are the same)"


def test_diff_rows_tags_on_hand_made_graphs():
    base = make_graph(BASE, "relu")
    assert [r.tag for r in diff_rows(base, base)] == ["equal"] * 4
    rows = diff_rows(base, make_graph(WITH_EXTRA, "relu"))
    assert [r.tag for r in rows] == ["equal", "equal", "insert", "equal", "equal"]
    assert rows[2].left is None and rows[2].right == "sin = aten.sin(x)"
    rows = diff_rows(make_graph(WITH_EXTRA, "relu"), base)
    assert [r.tag for r in rows] == ["equal", "equal", "delete", "equal", "equal"]
    assert rows[2].left == "sin = aten.sin(x)" and rows[2].right is None
    rows = diff_rows(base, make_graph(REPLACED, "gelu"))
    # a node of another name is removed and added; the return reads the new node: changed
    assert [r.tag for r in rows] == ["equal", "equal", "delete", "insert", "replace"]
    assert rows[2].left == "relu = aten.relu(mul)" and rows[3].right == "gelu = aten.gelu(mul)"
    assert rows[4].left.startswith("return") and rows[4].right.startswith("return")


def test_diff_rows_cover_both_graphs(mlp_rewrite):
    before, after = mlp_rewrite.before, mlp_rewrite.after
    rows = diff_rows(before, after)
    assert [r.left for r in rows if r.left is not None] == graph_lines(before)
    assert [r.right for r in rows if r.right is not None] == graph_lines(after)
    for r in rows:
        assert r.tag in ("equal", "delete", "insert", "replace")
        if r.tag == "equal":
            assert r.left == r.right
        elif r.tag == "insert":
            assert r.left is None and r.right is not None
        elif r.tag == "delete":
            assert r.left is not None and r.right is None
        else:
            assert r.left is not None and r.right is not None and r.left != r.right
    assert {"equal", "replace"} <= {r.tag for r in rows}
    assert any("rewrite.regelu2" in (r.right or "") for r in rows if r.tag != "equal")


# -- Report ------------------------------------------------------------------------------------


def test_report_text(mlp_rewrite):
    report = mlp_rewrite.report
    text = str(report)
    first = text.splitlines()[0]
    assert first.startswith("MLP captured in train mode (") and first.endswith("dynamic batch: x")
    assert "pass approx_bp: exact forward, approximate backward" in text
    assert "changed 4:" in text
    for change in report["approx_bp"].changes:
        assert change.node in text and f"{change.before} -> {change.after}" in text
    assert re.search(r"activation memory saved for backward: [\d.]+ KiB -> [\d.]+ KiB \(-\d+\.\d%\)", text)
    assert "outputs: relative error 0 (within float rounding)" in text
    assert re.search(r"gradients: relative error [\d.e-]+, cosine 0\.9\d+ \(approximate gradients\)", text)


def test_report_lookup(mlp_rewrite):
    report = mlp_rewrite.report
    assert len(report) == 1 and [p.name for p in report] == ["approx_bp"]
    assert report["approx_bp"].kind() == "exact forward, approximate backward"
    with pytest.raises(KeyError, match="approx_bp"):
        report["remat"]


def test_report_to_dict_is_json(mlp_rewrite):
    report = mlp_rewrite.report
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data
    assert data["model"] == "MLP" and data["mode"] == "train" and data["dynamic_inputs"] == ["x"]
    (p,) = data["passes"]
    assert p["name"] == "approx_bp" and p["spec"] == "approx_bp"
    assert p["options"] == {"gelu": True, "silu": True, "norms": True, "min_cosine": 0.9}
    assert p["kind"] == "exact forward, approximate backward"
    assert {c["after"] for c in p["changes"]} == {"rewrite.regelu2", "rewrite.ms_layer_norm"}
    assert set(p["changes"][0]) == {"node", "where", "before", "after", "detail"}
    numerics = p["numerics"]
    assert numerics["activation_bytes_after"] < numerics["activation_bytes_before"]
    assert numerics["output_rel_error"] == 0
    assert 0 < numerics["grad_rel_error"] < 0.5 and 0.9 < numerics["grad_cosine"] <= 1


def _odd_pass_report(numerics: Numerics | None) -> PassReport:
    return PassReport(
        name="odd", spec="odd{x=1}", options={"x": 1}, exact_forward=False, exact_backward=False,
        result=PassResult(), numerics=numerics, seconds=0.5,
    )


def test_report_with_non_finite_numerics_is_still_json():
    numerics = Numerics(
        outputs=[TensorError("out", torch.float32, math.inf, math.inf)],
        grads=[TensorError("w", torch.float32, math.nan, math.nan)],
        grad_rel_error=math.nan, grad_cosine=math.nan,
    )
    report = Report(model="Odd", mode="eval", capture_seconds=0.0, passes=[_odd_pass_report(numerics)])
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    n = data["passes"][0]["numerics"]
    assert n["output_rel_error"] == "inf" and n["grad_rel_error"] == "nan"
    assert "activation_bytes_before" not in n
    text = str(report)
    assert "pass odd{x=1}: approximate" in text and "changed nothing" in text and "CHANGED" in text


def test_report_without_numerics():
    report = Report(model="M", mode="eval", capture_seconds=1.5, notes=["a note"], passes=[_odd_pass_report(None)])
    text = str(report)
    assert "M captured in eval mode (1.50 s); dynamic batch: none" in text and "note: a note" in text
    assert "numerics" not in json.loads(json.dumps(report.to_dict()))["passes"][0]


@pytest.mark.parametrize(
    "n,text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536 * 1024, "1.5 MiB"), (3 * 1024**3, "3.0 GiB"), (5 * 1024**4, "5120.0 GiB")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


# -- HTML ----------------------------------------------------------------------------------------


def test_html_is_one_self_contained_page(vit_page):
    page = vit_page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<html") == 1 and page.count("<body") == 1
    assert not re.search(r"\b(src|href|srcset|action)\s*=", page, re.I), "the page refers to other files"
    assert not re.search(r"<\s*(link|script|iframe|img|object|embed)\b", page, re.I)
    assert "@import" not in page and "url(" not in page
    # The only URL is the SVG namespace name, which nothing fetches.
    assert set(re.findall(r"(?:https?:)?//[\w.-]+[^\s\"'<>]*", page)) == {"http://www.w3.org/2000/svg"}


def test_html_has_the_memory_chart(vit_rewrite, vit_page):
    p = vit_rewrite.report["approx_bp"]
    rows = _chart_rows(p)
    assert rows and len(rows) <= 40
    svg = re.search(r"<svg\b.*?</svg>", vit_page, re.S).group(0)
    assert svg.count("<rect") == 2 * len(rows)
    for name, before, after in rows:
        assert f">{html.escape(name)}</text>" in svg
        assert f"{format_bytes(before)} → {format_bytes(after)}" in svg
    assert "blocks.0.act" in svg and "(-94%)" in svg  # the GELU's saved input shrinks to 2 bits
    assert "Activation memory saved for backward, per module" in vit_page


def test_html_has_the_cards_and_changes_tables(vit_rewrite, vit_page):
    p = vit_rewrite.report["approx_bp"]
    assert "<span class='badge approx'>exact forward, approximate backward</span>" in vit_page
    assert f"What changed ({len(p.changes)})" in vit_page
    for c in p.changes:
        assert f"<td><code>{html.escape(c.node)}</code></td><td>{html.escape(c.where)}</td>" in vit_page
    assert f"Left alone ({len(p.skipped)})" in vit_page and p.skipped
    for s in p.skipped:
        assert html.escape(s.reason) in vit_page
    before, after = p.activation_bytes
    assert f"{format_bytes(before)} → {format_bytes(after)}" in vit_page
    assert f"{(after - before) / before:+.1%}" in vit_page


def test_html_diff_highlights_every_changed_line(vit_rewrite, vit_page):
    p = vit_rewrite.report["approx_bp"]
    rows = diff_rows(p.before, p.after)
    classes = {"delete": ("del", None), "insert": (None, "ins"), "replace": ("rep-l", "rep-r")}
    changed = [r for r in rows if r.tag != "equal"]
    assert changed
    for r in changed:
        left, right = classes[r.tag]
        if left:
            assert f"<td class='{left}'>{html.escape(r.left)}</td>" in vit_page, r
        if right:
            assert f"<td class='{right}'>{html.escape(r.right)}</td>" in vit_page, r
    assert "<table class='diff'>" in vit_page
    assert re.search(r"… \d+ unchanged lines …", vit_page)  # long unchanged stretches are folded
    highlighted = len(re.findall(r"<td class='(?:del|ins|rep-l|rep-r)'>", vit_page))
    assert highlighted == sum(2 if r.tag == "replace" else 1 for r in changed)


def test_html_escapes_what_it_shows():
    report = Report(model="<script>alert(1)</script>", mode="train", capture_seconds=0.0, notes=["<b>&"],
                    passes=[_odd_pass_report(None)])
    page = render_html(report)
    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;&amp;" in page


def test_memory_chart_svg():
    assert "Nothing was saved for backward" in memory_chart_svg([])
    long = "encoder.layers.10.self_attention.query_key_value.projection"
    svg = memory_chart_svg([(long, 2048, 1024), ("<top>", 4096, 0)])
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "…" + long[-37:] in svg and long not in svg  # long labels keep their end
    assert "&lt;top&gt;" in svg
    widths = [float(w) for w in re.findall(r'<rect [^>]*width="([\d.]+)"', svg)]
    assert widths == [260.0, 130.0, 520.0, 0.0]  # proportional to bytes, the largest bar full width
    assert "2.0 KiB → 1.0 KiB (-50%)" in svg and "4.0 KiB → 0 B (-100%)" in svg


def test_html_of_a_report_without_passes():
    page = render_html(Report(model="M", mode="eval", capture_seconds=0.0))
    assert "no passes" in page and "<svg" not in page


def test_write_html_writes_the_page_atomically(mlp_rewrite, tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old report")
    assert write_html(mlp_rewrite.report, target) == target
    assert target.read_text(encoding="utf-8") == render_html(mlp_rewrite.report)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_failed_write_html_leaves_the_old_file_and_no_temporary_files(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old report")
    broken = Report(model="M", mode="eval", capture_seconds=0.0, passes=[object()])  # rendering fails
    with pytest.raises(AttributeError):
        write_html(broken, target)
    assert target.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


# -- in a browser -------------------------------------------------------------------------------


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB rows of an 8-bit RGB/RGBA non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, bytearray()
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert depth == 8 and color in (2, 6) and interlace == 0
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(bytes(idat))
    assert len(raw) == height * (stride + 1)
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + (((line[i - bpp] if i >= bpp else 0) + prev[i]) >> 1)) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        else:
            assert kind == 0, f"bad PNG filter {kind}"
        rows.append(bytes(line) if bpp == 3 else bytes(v for k, v in enumerate(line) if k % 4 != 3))
        prev = line
    return width, height, rows


def _chromium(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (`chromium` on PATH) is not installed")
def test_report_renders_in_chromium(vit_rewrite, tmp_path):
    page = write_html(vit_rewrite.report, tmp_path / "report.html")
    url = page.resolve().as_uri()
    shot = tmp_path / "screenshot.png"
    proc = _chromium(f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,2000", url)
    assert shot.exists(), proc.stderr[-2000:]
    data = shot.read_bytes()
    shutil.copyfile(shot, SCREENSHOT_COPY)
    assert len(data) > 50_000, "the screenshot is nearly empty"

    width, height, rows = read_png(data)
    assert (width, height) == (1400, 2000)
    counts: dict[bytes, int] = {}
    for row in rows[::2]:
        for i in range(0, len(row), 3):
            pixel = row[i:i + 3]
            counts[pixel] = counts.get(pixel, 0) + 1
    assert len(counts) > 200, "too few distinct colours: the page did not render"
    assert counts.get(bytes(HEADER_DARK), 0) > 20_000, "no header band"
    assert counts.get(bytes(AFTER_BLUE), 0) > 1_000, "the chart's 'after' bars are not drawn"
    assert counts.get(bytes(BEFORE_GREY), 0) > 1_000, "the chart's 'before' bars are not drawn"

    proc = _chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<svg" in dom and dom.count("<rect") == render_html(vit_rewrite.report).count("<rect")
    assert '<table class="diff">' in dom and '<table class="list">' in dom
    assert "What changed (6)" in dom
    assert re.search(r'<td class="(ins|rep-r)">[^<]*rewrite\.regelu2', dom)


# -- emitted kernels in the HTML page --------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_rewrite():
    """examples/fuse_pointwise.py's Block through fuse_pointwise, approx_bp and codegen: the
    GELU in the middle of the marked region becomes rewrite.regelu2, the scale and residual
    add after it become one rewrite.pointwise."""
    import importlib.util

    from rewrite import pass_infra

    registered = dict(pass_infra._registered)
    spec = importlib.util.spec_from_file_location("example_fuse_pointwise", Path(__file__).parents[2] / "examples" / "fuse_pointwise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        torch.manual_seed(0)
        model = module.Block(dim=16)
        return optimize(model, ["fuse_pointwise", "approx_bp"], (torch.randn(4, 16),), codegen=True)
    finally:
        pass_infra._registered.clear()
        pass_infra._registered.update(registered)


def _kernels_element(page: str, pass_name: str) -> str:
    """From the pass's "Emitted kernels" heading to the next heading of the section (the
    graph diff) or its end."""
    start = page.index(f"<h3 id='{pass_name}-kernels'>")
    end = page.index("</section>", start)
    graphs = page.find(f"<h3 id='{pass_name}-graphs'>", start, end)
    return page[start : graphs if graphs != -1 else end]


def test_html_lists_the_kernels_of_the_pointwise_ops_codegen_added(fused_rewrite):
    page = render_html(fused_rewrite.report)
    assert page.count("id='codegen-kernels'") == 1
    section = _kernels_element(page, "codegen")
    listings = [k for k in fused_rewrite.kernels() if k.op == "rewrite.pointwise"]
    assert len(listings) == 1 and set(listings[0].sources) == {"forward", "backward"}
    for source in listings[0].sources.values():
        assert html.escape(source) in section
        assert "<" in source and source not in section  # shown as text, not as markup
    assert html.escape(listings[0].region) in section
    assert "rewrite.regelu2" not in section  # codegen lists only the ops it added


def test_html_approx_bp_section_lists_the_regelu2_kernels(fused_rewrite):
    page = render_html(fused_rewrite.report)
    section = _kernels_element(page, "approx_bp")
    listings = [k for k in fused_rewrite.kernels() if k.op == "rewrite.regelu2"]
    assert len(listings) == 1
    assert "<code>rewrite.regelu2</code>" in section
    for source in listings[0].sources.values():
        assert html.escape(source) in section
    assert "def packed2_forward(" in section and "def packed2_backward(" in section
    assert "rewrite.pointwise" not in section


def test_a_pass_that_changed_nothing_is_not_called_approximate():
    """QuickGELU (x * sigmoid(1.702 x), CLIP's) is another function than GELU: approx_bp leaves it."""

    class QuickGelu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return y * torch.sigmoid(1.702 * y)

    report = optimize(QuickGelu(), ["approx_bp"], (torch.randn(4, 8),)).report
    assert report["approx_bp"].kind() == "changed nothing"
    assert "approximate" not in str(report).split("\n", 2)[1]
    assert "approximate" not in report.to_dict()["passes"][0]["kind"]


def test_figures_are_numbers_formatted_by_the_unit_their_name_ends_with():
    from rewrite.report import figure_name, format_figure

    assert figure_name("measured_peak_before_bytes") == "measured peak before"
    assert format_figure("measured_peak_before_bytes", 65536) == "64.0 KiB"
    assert format_figure("solve_time_seconds", 1.234) == "1.23 s" and figure_name("solve_time_seconds") == "solve time"
    assert format_figure("measured_peak_ratio", 0.69732) == "0.697" and figure_name("measured_peak_ratio") == "measured peak ratio"
    assert format_figure("recompute_flops_overhead_fraction", 0.1) == "10.00%"
    assert format_figure("realized_over_budget_bytes", [1024, 2048]) == "1.0 KiB, 2.0 KiB"
    assert format_figure("gradient_cosine", 0.9989332411020533) == "0.99893"
    assert format_figure("recomputed_tensors", 3) == "3" and format_figure("solver", "moccasin optimal") == "moccasin optimal"
