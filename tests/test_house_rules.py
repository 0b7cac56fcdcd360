"""The house rules of STYLE.md that a program can check: import direction, documented defaults, file and function size."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import diffusers_mar
from tests.testing_utils import REPO_ROOT

PACKAGE = REPO_ROOT / "diffusers_mar"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 120
# ``name (`type`, *optional*, defaults to X):`` in diffusers' docstring format.
DOCUMENTED_DEFAULT = re.compile(r"^\s+(\w+) \(.*\*optional\*, defaults to (.+?)\):\s*$")


def _python_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*.py") if "__pycache__" not in path.parts)


def test_the_package_never_imports_training_conversion_or_benchmarks():
    forbidden = ("training", "conversion", "benchmarks", "tests")
    offenders = []
    for path in _python_files(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(REPO_ROOT)}: {name}" for name in names if name.split(".")[0] in forbidden
            ]
    assert offenders == []


def test_no_package_file_is_over_500_lines():
    long_files = {
        str(path.relative_to(REPO_ROOT)): n
        for path in _python_files(PACKAGE)
        if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert long_files == {}


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function without its docstring (argument parsers are exempt by name)."""
    lines = node.end_lineno - node.lineno + 1
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        if isinstance(body[0].value.value, str):
            lines -= body[0].end_lineno - body[0].lineno + 1
    return lines


def _function_lengths(folder: str) -> dict[str, int]:
    """Code lines of every function outside argument parsers, by `path::name`."""
    lengths = {}
    for path in _python_files(REPO_ROOT / folder):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "parse" not in node.name:
                lengths[f"{path.relative_to(REPO_ROOT)}::{node.name}"] = _code_lines(node)
    return lengths


@pytest.mark.parametrize("folder", ["diffusers_mar", "conversion", "training"])
def test_no_function_is_over_120_lines_of_code(folder):
    # Issue 13: the training scripts' `main` (one linear loop, as nanoGPT's) aim at about 250 lines instead.
    limits = {"training/train_mar.py::main": 250, "training/train_vqvae.py::main": 250}
    lengths = _function_lengths(folder)
    assert lengths  # the walk found the functions
    too_long = {name: n for name, n in lengths.items() if n > limits.get(name, MAX_FUNCTION_LINES)}
    assert too_long == {}


def _public_callables():
    """(qualified name, callable, docstring) for the exported classes' documented methods and exported functions."""
    for name in diffusers_mar.__all__:
        obj = getattr(diffusers_mar, name)
        if inspect.isclass(obj):
            # A class docstring's "Parameters:" documents `__init__`.
            yield f"{name}.__init__", obj.__init__, obj.__doc__ or ""
            for method_name, method in vars(obj).items():
                if method_name.startswith("_") and method_name != "__call__":
                    continue
                if inspect.isfunction(method) and method.__doc__:
                    yield f"{name}.{method_name}", method, method.__doc__
        elif inspect.isfunction(obj) and obj.__doc__:
            yield name, obj, obj.__doc__


def _same(documented: str, default: object) -> bool:
    text = documented.strip().strip("`")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text == repr(default) or text == str(default)
    return value == default and type(value) is type(default) or (isinstance(default, float) and value == default)


def test_documented_defaults_equal_the_signature():
    mismatches, checked = [], 0
    for qualified, function, doc in _public_callables():
        parameters = inspect.signature(function).parameters
        for line in doc.splitlines():
            match = DOCUMENTED_DEFAULT.match(line)
            if not match or match.group(1) not in parameters:
                continue
            name, documented = match.groups()
            default = parameters[name].default
            checked += 1
            if default is inspect.Parameter.empty or not _same(documented, default):
                mismatches.append(f"{qualified}({name}): documented {documented}, signature {default!r}")
    assert checked > 20  # the check found the documented defaults at all
    assert mismatches == []


def test_documented_default_check_catches_a_mismatch():
    def function(steps: int = 64) -> None:
        """Args:
        steps (`int`, *optional*, defaults to 100):
            Steps."""

    match = DOCUMENTED_DEFAULT.match(function.__doc__.splitlines()[1].replace("        ", "    "))
    assert match and not _same(match.group(2), 64) and _same("64", 64) and _same('`"pil"`', "pil")
