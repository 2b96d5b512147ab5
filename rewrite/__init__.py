"""rewrite: compiler-style graph rewriting for PyTorch models.

    from rewrite import optimize
    m = optimize(model, passes=["approx_bp"], example_inputs=(x,))
    m(x).sum().backward()          # trains like the original
    print(m.report)                # what changed, what it measured
    rewrite.save(m, "model.pt2")   # loads back with rewrite.load after `import rewrite`
"""

from rewrite import ops  # registers torch.ops.rewrite.* (needed to load rewritten .pt2 files)
from rewrite.api import optimize
from rewrite.capture import capture
from rewrite.errors import CaptureError, CheckpointError, OptionError, PassError, RewriteError
from rewrite.graph import add_parameter, replace_by_example
from rewrite.module import RewrittenModule
from rewrite.pass_infra import Change, Pass, PassContext, PassResult, Skip, option, pass_names, register_pass
from rewrite.pass_manager import PassManager
from rewrite.pattern import Match, Rule, Rules, any_of, maybe_cast, number, op, var
from rewrite.regions import grow_pointwise_region, mark_region
from rewrite.report import Report
from rewrite.serialize import load, save

__all__ = [
    "CaptureError",
    "Change",
    "CheckpointError",
    "Match",
    "OptionError",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "Report",
    "RewriteError",
    "RewrittenModule",
    "Rule",
    "Rules",
    "Skip",
    "add_parameter",
    "any_of",
    "capture",
    "grow_pointwise_region",
    "load",
    "mark_region",
    "maybe_cast",
    "number",
    "op",
    "ops",
    "optimize",
    "option",
    "pass_names",
    "register_pass",
    "replace_by_example",
    "save",
    "var",
]
