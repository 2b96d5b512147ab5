"""remat's plan cache (passes/remat/cache.py): a second optimize of the same step is a hit with
the same schedule; a corrupt or hostile file is ignored with a warning and solved again;
cache=False neither reads nor writes."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import passes
from passes.remat import cache, plan
from rewrite import optimize
from rewrite.training_step import TRAINING_STEP


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + F.gelu(self.fc(self.norm(x)))


class Stack(nn.Module):
    def __init__(self, dim=32, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def planned(**options):
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(64, 32)
    module = optimize(model, [passes.Remat(budget=0.6, time_limit=10, workers=2, **options)], (x,), verify=False)
    partition = next(iter(module.meta[TRAINING_STEP].partitions.values()))
    return module.report["remat"].figures, partition.intervals


@pytest.fixture
def plans(tmp_path, monkeypatch):
    monkeypatch.setenv("REWRITE_PLAN_CACHE", str(tmp_path))
    return tmp_path


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REWRITE_PLAN_CACHE", str(tmp_path / "a"))
    assert cache.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("REWRITE_PLAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "rewrite" / "plans"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "rewrite" / "plans"


@pytest.mark.slow  # kept out of make test's 6 minutes
def test_the_same_step_again_is_a_hit_with_the_same_schedule(plans, monkeypatch):
    first, intervals = planned()
    assert first["plan_cache"] == "miss" and first["recompute_cost"] > 0
    files = list(plans.glob("*.json"))
    assert files and all(json.loads(f.read_text())["format"] == cache.FORMAT for f in files)
    probed = []
    monkeypatch.setattr(plan, "_auto_order", lambda *args: probed.append(args) or (plan.AUTO_INTERVALS, None, False))
    second, again = planned()
    assert second["plan_cache"] == "hit" and not probed  # a plan stored at some setting needs no probe
    assert again == intervals
    assert second["recompute_cost"] == first["recompute_cost"]
    assert second["solve_time_seconds"] < first["solve_time_seconds"]
    # another setting of intervals than the one that found it (intervals=0 may try several): another problem
    other, _ = planned(intervals=4 if first["intervals"] != 4 else 2)
    assert other["plan_cache"] == "miss"


def _corrupt(plans, edit):
    for path in plans.glob("*.json"):
        path.write_text(edit(path.read_text()))


def _unknown_name(text):
    data = json.loads(text)
    name = next(iter(data["intervals"]))
    data["intervals"]["os.system('rm -rf /')"] = data["intervals"].pop(name)
    return json.dumps(data)


def _over_budget(text):
    # every tensor kept from its computation to the end: valid, but far over the budget
    data = json.loads(text)
    last = max(spans[-1][1] for spans in data["intervals"].values())
    data["intervals"] = {name: [[spans[0][0], last]] for name, spans in data["intervals"].items()}
    return json.dumps(data)


def _wrong_types(text):
    data = json.loads(text)
    for spans in data["intervals"].values():
        spans[0] = [str(spans[0][0]), spans[0][1]]
    return json.dumps(data)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda text: text[: len(text) // 2], id="truncated"),
        *(pytest.param(edit, id=name, marks=pytest.mark.slow) for name, edit in
          [("not-a-plan", lambda text: "[1, 2, 3]"), ("unknown-name", _unknown_name), ("over-budget", _over_budget),
           ("wrong-types", _wrong_types)]),
    ],
)  # fmt: skip
def test_a_bad_cache_file_is_ignored_with_a_warning_and_solved_again(plans, edit):
    first, intervals = planned()
    _corrupt(plans, edit)
    with pytest.warns(UserWarning, match="ignoring the cached plan"):
        again, solved = planned()
    assert again["plan_cache"] == "miss"
    assert again["recompute_cost"] == pytest.approx(first["recompute_cost"], rel=0.05)
    third, _ = planned()  # the bad file was replaced by the new plan
    assert third["plan_cache"] == "hit"


@pytest.mark.slow  # kept out of make test's 6 minutes
def test_cache_off_neither_reads_nor_writes(plans):
    off, _ = planned(cache=False)
    assert off["plan_cache"] == "off" and not list(plans.glob("*.json"))
    planned()
    written = {p: p.read_text() for p in plans.glob("*.json")}
    off, _ = planned(cache=False)
    assert off["plan_cache"] == "off"
    assert {p: p.read_text() for p in plans.glob("*.json")} == written
