"""`--model` as a Hugging Face Hub id on a machine without the Hub: a clear error at once (no retries), and a model
already in the local cache still loads (the real `from_pretrained` path, run on a cache laid out by hand)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from huggingface_hub import constants

from diffusers_mar import DEFAULT_MODEL, cli
from diffusers_mar.hub import hub_unreachable_reason
from tests.testing_utils import REPO_ROOT


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup fails, as on a machine without network; records the lookups and the sleeps (a retry of
    huggingface_hub's backoff sleeps first), and returns at once from each sleep."""
    calls = {"lookups": [], "sleeps": []}

    def failing_lookup(host, *args, **kwargs):
        calls["lookups"].append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", failing_lookup)
    monkeypatch.setattr(time, "sleep", calls["sleeps"].append)
    return calls


def test_an_unresolvable_hub_fails_after_one_lookup(no_network):
    with pytest.raises(cli.CLIError) as raised:
        cli.load_pipeline("nobody/no-such-model")
    message = str(raised.value)
    assert message.startswith("argument --model: 'nobody/no-such-model' is not a local folder")
    assert "not in the local Hugging Face cache" in message
    assert "huggingface.co cannot be resolved: Name or service not known" in message
    assert raised.value.exit_code == cli.EXIT_USAGE
    # Our one lookup, then at most huggingface_hub's own user-agent registry (one request, not retried); a download
    # attempt would add its HEAD request and the backoff's sleeps.
    assert no_network["lookups"][0] == "huggingface.co"
    assert len(no_network["lookups"]) <= 2
    assert no_network["sleeps"] == []


def test_hf_hub_offline_is_named_and_nothing_is_looked_up(no_network, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable_reason() == "HF_HUB_OFFLINE=1 is set"
    with pytest.raises(cli.CLIError, match=r"cannot be reached \(HF_HUB_OFFLINE=1 is set\)"):
        cli.load_pipeline("nobody/no-such-model")
    assert no_network == {"lookups": [], "sleeps": []}


def test_a_reachable_hub_is_not_reported(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])
    assert hub_unreachable_reason() is None


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unresolvable endpoint"])
def test_a_cached_hub_model_loads_without_network(tmp_path, offline):
    # The cache layout huggingface_hub writes: models--<org>--<name>/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--digits"
    shutil.copytree(DEFAULT_MODEL, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update({"HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    if offline == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "https://hub.example.invalid"  # .invalid never resolves (RFC 2606)
    command = [sys.executable, "-m", "diffusers_mar", "info", "--model", "someone/digits", "--json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert '"pipeline": "MARPipeline"' in result.stdout
    assert result.stderr == ""
