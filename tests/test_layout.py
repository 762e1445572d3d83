"""The record/ package's imports go one way: Trainer event (callback) -> run state (run, facts) ->
records (logger, recorder) -> sinks. Read from the sources' import statements."""
from __future__ import annotations

import ast
from pathlib import Path

RECORD = Path(__file__).resolve().parents[1] / "seo_trainlog" / "record"


def record_imports(module: str) -> set[str]:
    """The ``record/`` modules ``record/<module>.py`` imports (``from . import x``, ``from .x import y``,
    ``from ..record.x import y``), anywhere in the file (lazy imports in functions included)."""
    tree = ast.parse((RECORD / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = node.module or ""
            if node.level == 1 and not base:
                found.update(alias.name for alias in node.names)
            elif node.level == 1:
                found.add(base.split(".")[0])
            elif node.level == 2 and base.startswith("record."):
                found.add(base.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[2] for alias in node.names
                         if alias.name.startswith("seo_trainlog.record."))
    return found


def test_the_callback_is_split_into_lifecycle_run_state_and_facts():
    assert {"run", "facts", "logger"} <= record_imports("callback")
    assert {"recorder", "sinks"} <= record_imports("logger")


def test_record_imports_go_one_way():
    downstream = {  # a module may not import any of these (what sits upstream of it)
        "run": {"callback"},
        "facts": {"callback", "run"},
        "logger": {"callback", "run", "facts"},
        "recorder": {"callback", "run", "facts", "logger", "sinks"},
        "sinks": {"callback", "run", "facts", "logger", "recorder"},
        "format": {"callback", "run", "facts", "logger", "recorder", "sinks"},
    }
    wrong = {module: record_imports(module) & upstream for module, upstream in downstream.items()}
    assert wrong == {module: set() for module in downstream}


def test_the_command_line_imports_no_logging_or_training_library():
    """``seo-trainlog`` only reads files: its start-up (every command pays it) imports neither loguru
    (the writing side's sinks) nor torch, transformers, psutil or matplotlib."""
    import subprocess
    import sys

    code = ("import sys, seo_trainlog.cli; print(sorted(name for name in ('loguru', 'torch', 'transformers', "
            "'psutil', 'matplotlib', 'numpy') if name in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                               cwd=Path(__file__).resolve().parents[1])
    assert completed.stdout.strip() == "[]"
