"""Errors a user sees. Each carries one message that says what went wrong, where, and what to do.

The CLI prints ``error: <message>`` for any of these and exits with status 2, without a
traceback; anything else escaping is a bug in the toolkit and keeps its traceback.
"""

from __future__ import annotations


class RewriteError(Exception):
    """Base of every error caused by the user's input (model, file, option)."""

    exit_status = 2


class CaptureError(RewriteError):
    """The model could not be captured as a graph by torch.export."""


class OptionError(RewriteError):
    """An unknown pass, an unknown option, or an option value of the wrong kind."""


class PassError(RewriteError):
    """A pass failed its precondition, broke the graph, or changed the numerics."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"pass {pass_name!r}: {message}")
        self.pass_name = pass_name


class CheckpointError(RewriteError):
    """A file could not be read, or holds something rewrite refuses to load."""


class KernelCacheError(RewriteError):
    """The directory of emitted Triton kernels cannot be used (see ``codegen.cache``); not a
    pass's fault, so no pass is named."""
