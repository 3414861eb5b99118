"""Quiet by default: the notices of third-party libraries that a user cannot act on are filtered out of a
`cyclej` command's output; `--verbose` shows them.

What is filtered, and how (each is set before the library is imported, and through the environment so the
processes a command starts, the run process and vLLM's engine, inherit it):
- Python warnings: ignored unless attributed to the project's own modules (`PROJECT_MODULES`), which keep
  Python's default; developer warnings (`DEVELOPER_WARNINGS`: torch/transformers/vLLM `FutureWarning`s, a
  library deprecating what our code calls, a library's unclosed resource) are ignored wherever they point;
- vLLM's logger (engine details, the Triton notice): errors only;
- torch's C++ log (the NUMA binding notice of vLLM's CPU engine): errors only;
- transformers' logger (e.g. the "LOAD REPORT" of a classifier head that is new by design): errors only.

What stays: progress bars (tqdm, written by the project and by transformers' loaders), the project's own
log lines (the `cyclej` loggers, Prefect's INFO lines about the flow and its tasks) and every error. A value
the user set in the environment (VLLM_LOGGING_LEVEL, TRANSFORMERS_VERBOSITY, TORCH_CPP_LOG_LEVEL,
PYTHONWARNINGS) is left alone.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence

VERBOSE_FLAG = "--verbose"
# What Python itself hides by default (developer news), plus FutureWarning, which libraries use the same way.
DEVELOPER_WARNINGS: tuple[type[Warning], ...] = (
    DeprecationWarning,
    PendingDeprecationWarning,
    FutureWarning,
    ImportWarning,
    ResourceWarning,
)
# Set by `configure` for the processes this one starts: "1" quiet, "0" verbose.
QUIET_ENV_FLAG = "CYCLEJ_QUIET"
# Warnings attributed to these modules (the warning's module after `stacklevel`) are the project's own.
PROJECT_MODULES = r"(cyclej|flows|tasks|infra|bench)(\..*)?"
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    # torch's C++ warnings ("[W… utils.cpp:68] Warning: NUMA binding: …" in vLLM's CPU engine) print
    # straight to stderr, outside Python's warnings.
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    # Child processes that are not `cyclej` (vLLM's engine core, torchrun's ranks) get no module filter
    # from this file: every warning there comes from a library.
    "PYTHONWARNINGS": "ignore",
}
# With --verbose vLLM logs at its own default level;
# cyclej.generation.backends would otherwise lower it to ERROR.
VERBOSE_ENV = {"VLLM_LOGGING_LEVEL": "INFO"}


def wants_verbose(argv: Sequence[str]) -> bool:
    """`--verbose` anywhere on the command line (read before the command parses it, because libraries
    imported while parsing would already have printed)."""
    return VERBOSE_FLAG in argv


def configure(verbose: bool) -> None:
    """Filter (or, verbose, keep) third-party notices for this process and the processes it starts."""
    if verbose:
        os.environ[QUIET_ENV_FLAG] = "0"
        for key, value in VERBOSE_ENV.items():
            os.environ.setdefault(key, value)
        return
    os.environ[QUIET_ENV_FLAG] = "1"
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    apply()


def apply_if_inherited() -> None:
    """In a process started by a quiet `cyclej` (vLLM's engine core is spawned: it imports `cyclej.cli` as
    its main module but never runs `main()`), the same filters as its parent."""
    if os.environ.get(QUIET_ENV_FLAG) == "1":
        apply()


def apply() -> None:
    """This process's filters. The environment alone is not enough: vLLM logs its import-time notices (the
    Triton one) before it configures its logger, through Python's last-resort handler, which no variable
    turns off; and PYTHONWARNINGS cannot tell the project's modules from the libraries'."""
    if os.environ.get("VLLM_LOGGING_LEVEL") == QUIET_ENV["VLLM_LOGGING_LEVEL"]:
        logging.getLogger("vllm").setLevel(logging.ERROR)
    if os.environ.get("PYTHONWARNINGS") == QUIET_ENV["PYTHONWARNINGS"]:  # else the user chose their own
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=PROJECT_MODULES)
        # Checked first (each call inserts at the front): a library's deprecation is attributed to the
        # line that calls it, often ours (sentence_transformers' warns at cyclej/models/embedder.py's import;
        # zmq's unclosed-context ResourceWarning at cyclej/generation/backends.py's engine shutdown), and is
        # news for the project's developers, who see it under pytest, not for a user.
        for category in DEVELOPER_WARNINGS:
            warnings.filterwarnings("ignore", category=category)
