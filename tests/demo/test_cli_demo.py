"""`diffusers-mar demo` on the command line: its options, its checks before the server starts (Gradio missing, a
model that does not load or of an unknown family), and the Space's `app.py` of docs/demo.md."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from diffusers_mar import DEFAULT_MODEL, cli
from diffusers_mar.cli.parser import build_parser
from diffusers_mar.demo import app
from tests.test_install import EXTRAS_ONLY, run_hidden
from tests.testing_utils import REPO_ROOT


def test_the_options_and_their_defaults():
    args = build_parser().parse_args(["demo"])
    assert (args.model, args.port, args.host, args.share) == ([DEFAULT_MODEL], None, None, False)
    assert (args.device, args.dtype, args.num_threads) == ("cpu", "float32", "auto")
    args = build_parser().parse_args(["demo", "--model", "a", "b", "--port", "8000", "--host", "0.0.0.0", "--share"])
    assert (args.model, args.port, args.host, args.share) == (["a", "b"], 8000, "0.0.0.0", True)


def test_a_bad_port_is_a_usage_error(capsys):
    assert cli.main(["demo", "--port", "0"]) == 2
    assert "argument --port: must be a port number in [1, 65535]; got 0" in capsys.readouterr().err


@pytest.fixture
def launches(monkeypatch):
    """The calls of `launch_demo` (the server is not started)."""
    calls = []
    monkeypatch.setattr(
        app, "launch_demo", lambda models, host, port, share: calls.append((models, host, port, share))
    )
    return calls


def test_demo_loads_every_model_then_serves_them(launches, mar_folder, ar_folder):
    argv = ["demo", "--model", str(mar_folder), str(ar_folder), str(mar_folder), "--num-threads", "2"]
    assert cli.main(argv) == 0
    [(models, host, port, share)] = launches
    assert [model.source for model in models] == [str(mar_folder), str(ar_folder)]  # each model once
    assert [model.adapter.name for model in models] == ["MAR", "AR"] and models[0].num_threads == 2
    assert (host, port, share) == (None, None, False)  # launch_settings: 127.0.0.1, no link


def test_no_server_starts_for_a_model_that_cannot_be_served(launches, mar_folder, tmp_path, capsys):
    xyz = tmp_path / "xyz"
    shutil.copytree(mar_folder, xyz)
    index = json.loads((xyz / "model_index.json").read_text())
    (xyz / "model_index.json").write_text(json.dumps({**index, "_class_name": "XYZPipeline"}))
    assert cli.main(["demo", "--model", str(mar_folder), str(xyz)]) == 2
    assert "holds a XYZPipeline, which the demo does not know" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "argument --model: no such folder" in capsys.readouterr().err
    assert launches == []


def test_without_gradio_the_command_says_how_to_install_it():
    code = "from diffusers_mar.cli import main\nsys.exit(main(['demo']))"
    result = run_hidden(EXTRAS_ONLY, code)
    assert result.returncode == 1
    assert result.stderr == (
        "diffusers-mar demo: error: the demo needs Gradio, which the base install does not bring: "
        "pip install 'diffusers-mar[demo]'\n"
    )


def test_the_spaces_app_py_runs_the_demo_command(monkeypatch):
    text = (REPO_ROOT / "docs" / "demo.md").read_text()
    section = text[text.index("## A Space in one file") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code.startswith("# app.py")
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    with pytest.raises(SystemExit) as exit_:
        exec(code, {})
    assert exit_.value.code == 0
    args = build_parser().parse_args(calls[0])
    assert (args.command, args.model, args.host, args.port) == ("demo", ["your-name/mar-digits"], "0.0.0.0", 7860)
