"""The demo's server is safe by default, checked on a running server (in this process, no browser): it listens on
127.0.0.1, makes no public link, ignores Gradio's environment variables that would widen it, serves no file outside
its outputs folder (what the installed Gradio would serve by default is checked too), refuses oversized and
malformed uploads with an error, shows our message for a refused input and one line for an unexpected failure, and
queues each model's events one at a time."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import httpx
import PIL.Image
import pytest

pytest.importorskip("gradio")

import gradio  # noqa: E402
from gradio.utils import get_upload_folder, is_allowed_file  # noqa: E402

from diffusers_mar import DEFAULT_MODEL  # noqa: E402
from diffusers_mar.demo import actions  # noqa: E402
from diffusers_mar.demo.app import build_demo  # noqa: E402
from diffusers_mar.demo.model import load_model  # noqa: E402
from diffusers_mar.demo.security import (  # noqa: E402
    QUEUE_SIZE,
    launch_settings,
    make_outputs_dir,
    use_outputs_dir,
)
from tests.testing_utils import REPO_ROOT  # noqa: E402

# Gradio's variables that would open the server wider than the demo's settings.
WIDENING = {
    "GRADIO_SERVER_NAME": "0.0.0.0",
    "GRADIO_SHARE": "True",
    "GRADIO_ALLOWED_PATHS": "/",
    "GRADIO_MCP_SERVER": "True",
}


@pytest.fixture(scope="module")
def server(mar_folder, tmp_path_factory):
    """A running demo of the tiny MAR model and the shipped one, with Gradio's widening variables set."""
    cache = tmp_path_factory.mktemp("examples_cache")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**WIDENING, "GRADIO_EXAMPLES_CACHE": str(cache)}.items():
            patch.setenv(name, value)
        patch.delenv("GRADIO_TEMP_DIR", raising=False)  # restored after the module (`use_outputs_dir` sets it)
        outputs_dir = make_outputs_dir()
        use_outputs_dir(outputs_dir)
        models = [load_model(str(mar_folder)), load_model(DEFAULT_MODEL)]
        demo = build_demo(models, outputs_dir)
        settings = launch_settings(outputs_dir, port=free_port())
        _, url, share_url = demo.launch(**settings)
        try:
            yield {
                "demo": demo,
                "url": url.rstrip("/"),
                "share_url": share_url,
                "outputs": outputs_dir,
                "cache": cache,
            }
        finally:
            demo.close()
            shutil.rmtree(outputs_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call_api(url: str, name: str, data: list) -> tuple[str, object]:
    """Call an event through Gradio's HTTP API: ("complete", outputs) or ("error", message)."""
    event_id = httpx.post(f"{url}/gradio_api/call/{name}", json={"data": data}, timeout=30).json()["event_id"]
    event, payload = None, None
    with httpx.stream("GET", f"{url}/gradio_api/call/{name}/{event_id}", timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event in ("complete", "error"):
                payload = json.loads(line[len("data: ") :])
                break
    return event, payload


def upload(url: str, name: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}/gradio_api/upload", files={"files": (name, data)}, timeout=60)


def png_file(url: str, image: PIL.Image.Image) -> dict:
    """`image` uploaded as a PNG, as Gradio's file data."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = upload(url, "image.png", buffer.getvalue()).json()[0]
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "image.png"}


def test_the_settings_are_safe_by_default_and_open_only_on_request():
    settings = launch_settings(Path("/outputs"))
    assert (settings["server_name"], settings["share"], settings["allowed_paths"]) == (
        "127.0.0.1",
        False,
        ["/outputs"],
    )
    assert (
        settings["mcp_server"] is False and settings["enable_monitoring"] is False and settings["show_error"] is False
    )
    assert settings["max_file_size"] == "10mb" and settings["run_history"] is False
    opened = launch_settings(Path("/outputs"), host="0.0.0.0", port=7000, share=True)
    assert (opened["server_name"], opened["server_port"], opened["share"]) == ("0.0.0.0", 7000, True)


def test_gradios_environment_variables_do_not_widen_the_server(server):
    demo = server["demo"]
    assert all(os.environ[name] == value for name, value in WIDENING.items())  # set while it launched
    assert demo.server_name == "127.0.0.1" and server["url"].startswith("http://127.0.0.1:")
    assert demo.share is False and server["share_url"] is None
    assert demo.allowed_paths == [str(server["outputs"])]
    assert demo.analytics_enabled is False
    assert httpx.get(f"{server['url']}/monitoring", timeout=10).status_code in (403, 404)


def test_files_are_served_from_the_outputs_folder_only(server, mar_folder, tmp_path):
    url, outputs = server["url"], server["outputs"]
    (outputs / "grid.png").write_bytes(b"an output")
    (server["cache"] / "secret.txt").write_text("an examples cache")
    shared_upload_folder = Path(tempfile.gettempdir()) / "gradio" / "diffusers-mar-test"
    shared_upload_folder.mkdir(parents=True, exist_ok=True)
    (shared_upload_folder / "other-app.txt").write_text("another Gradio app's upload")
    (tmp_path / "outside.txt").write_text("outside")
    refused = [
        mar_folder / "transformer" / "diffusion_pytorch_model.safetensors",  # the model folder
        mar_folder / "model_index.json",
        server["cache"] / "secret.txt",  # Gradio's examples cache
        shared_upload_folder / "other-app.txt",  # Gradio's default upload folder, shared by every app
        tmp_path / "outside.txt",
        REPO_ROOT / "README.md",
        Path("/etc/passwd"),
    ]
    try:
        assert httpx.get(f"{url}/gradio_api/file={outputs / 'grid.png'}", timeout=10).text == "an output"
        for path in refused:
            for route in ("/gradio_api/file=", "/file="):
                response = httpx.get(f"{url}{route}{path}", timeout=10)
                assert response.status_code in (403, 404), (route, path, response.status_code)
    finally:
        shutil.rmtree(shared_upload_folder)


def test_what_gradio_serves_by_default(server):
    """Without the demo's settings, the installed Gradio serves its examples cache and its shared upload folder."""
    cache_file = server["cache"] / "secret.txt"
    cache_file.write_text("an examples cache")
    shared = Path(tempfile.gettempdir()) / "gradio" / "x.png"
    defaults = {"blocked_paths": [], "allowed_paths": []}
    assert is_allowed_file(cache_file, **defaults, created_paths=[os.environ["GRADIO_TEMP_DIR"], str(server["cache"])])
    assert is_allowed_file(shared, **defaults, created_paths=[str(Path(tempfile.gettempdir()) / "gradio")])
    assert get_upload_folder() == str(server["outputs"])  # the demo's own folder instead
    demo = server["demo"]
    assert not is_allowed_file(cache_file, demo.blocked_paths, demo.allowed_paths, [str(server["cache"])])[0]


def test_oversized_and_malformed_uploads_are_errors_not_crashes(server):
    url = server["url"]
    response = upload(url, "big.png", b"\0" * (11 * 1024 * 1024))
    assert response.status_code == 413
    text = upload(url, "text.png", b"not an image").json()[0]
    file = {"path": text, "meta": {"_type": "gradio.FileData"}, "orig_name": "text.png"}
    editor = {"background": file, "layers": [], "composite": None, "id": None}
    event, message = call_api(url, "inpaint", [editor, 3, 0, 1.5, 0, False])
    assert (event, message["error"]) == ("error", "the upload is not a readable image (PNG, JPEG, WebP, BMP or GIF)")
    # A file of the server named in the request: Gradio refuses it (not uploaded), before the demo sees it.
    escape = {"background": {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "layers": [], "id": None}
    assert call_api(url, "inpaint", [escape, 3, 0, 1.5, 0, False]) == ("error", {"error": None})
    assert httpx.get(url, timeout=10).status_code == 200  # still serving


def test_a_refused_input_shows_our_message(server):
    event, message = call_api(server["url"], "compare", ["0 banana", 1, 0, "fast"])
    assert event == "error" and message["error"].startswith("class labels: unknown class name 'banana'; known names")
    event, message = call_api(server["url"], "digits_sample", [1797])
    assert (event, message["error"]) == ("error", "the digits sample must be a whole number in [0, 1796]; got 1797")
    # A pipeline's ValueError: its message too.
    background = png_file(server["url"], PIL.Image.new("RGB", (8, 8)))
    layer = png_file(server["url"], PIL.Image.new("RGBA", (8, 8), (255, 0, 0, 255)))
    editor = {"background": background, "layers": [layer], "composite": None, "id": None}
    event, message = call_api(server["url"], "inpaint", [editor, 3, 0, -1.0, 0, False])
    assert (event, message["error"]) == ("error", "`guidance_scale` must be a finite number >= 0; got -1.0.")


def test_an_unexpected_failure_shows_one_line_without_its_details(server, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("a detail for the log only: /secret/path")

    monkeypatch.setattr(actions, "compare", broken)
    event, message = call_api(server["url"], "compare", ["1", 1, 0, "fast"])
    assert (event, message["error"]) == (
        "error",
        "unexpected failure (RuntimeError); the server's log has the details",
    )
    assert "a detail for the log only" in capsys.readouterr().err  # the traceback, in the server's log


def test_each_model_has_its_own_queue_of_one(server):
    demo = server["demo"]
    model_events = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name and not fn.api_name.startswith("stop")}
    for index, suffix in ((0, ""), (1, "_1")):
        for name in ("generate", "inpaint", "compare"):
            fn = model_events[name + suffix]
            assert (fn.concurrency_limit, fn.concurrency_id) == (1, f"model-{index}"), name + suffix
    assert demo._queue.max_size == QUEUE_SIZE


def test_a_png_output_is_a_png(server):
    event, outputs = call_api(server["url"], "digits_sample", [3])
    assert event == "complete"
    background = outputs[0]["background"]
    data = httpx.get(f"{server['url']}/gradio_api/file={background['path']}", timeout=10).content
    assert PIL.Image.open(io.BytesIO(data)).size == (256, 256)
    assert Path(background["path"]).is_relative_to(server["outputs"])
    assert int(gradio.__version__.split(".")[0]) >= 6  # the version whose file serving this module checks
