"""The demo's server settings, safe by default: it listens on 127.0.0.1 unless `--host` says otherwise, makes no
public link unless `--share`, sends no telemetry, serves no monitoring page or MCP server, limits uploads, and serves
no file outside its own outputs folder.

What Gradio serves (`/gradio_api/file=`), as checked in its `file_fetch` (gradio 6): `allowed_paths`, files of
`gr.set_static_paths`, its upload folder (`GRADIO_TEMP_DIR`, by default `<tmp>/gradio`, shared by every Gradio app of
the machine) and its examples cache (`GRADIO_EXAMPLES_CACHE`, by default `.gradio/cached_examples` under the working
folder); `blocked_paths` win over all of them. The demo therefore points `GRADIO_TEMP_DIR` at a fresh folder of its
own (uploads and outputs both land there), allows nothing else and blocks the examples cache. It does not serve the
model folder: nothing in the interface needs a file from it. `tests/demo/test_security.py` checks each rule on a
running server.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
MAX_FILE_SIZE = "10mb"  # per upload; Gradio answers 413 to a larger one
QUEUE_SIZE = 32  # waiting events per app; a full queue tells the user so instead of growing without bound
DELETE_CACHE = (600, 3600)  # every 10 minutes, delete outputs older than an hour


def make_outputs_dir() -> Path:
    """A fresh private folder for the demo's uploads and outputs (Gradio's upload folder, `GRADIO_TEMP_DIR`)."""
    return Path(tempfile.mkdtemp(prefix="diffusers-mar-demo-")).resolve()


def use_outputs_dir(outputs_dir: Path) -> None:
    """Make Gradio keep uploads and outputs in `outputs_dir`; call before the interface is built (Gradio's components
    read `GRADIO_TEMP_DIR` when they are made)."""
    os.environ["GRADIO_TEMP_DIR"] = str(outputs_dir)


def examples_cache_dir() -> Path:
    return Path(os.environ.get("GRADIO_EXAMPLES_CACHE", ".gradio/cached_examples")).resolve()


def launch_settings(outputs_dir: Path, host: str | None = None, port: int | None = None, share: bool = False) -> dict:
    """Keyword arguments of `gr.Blocks.launch` for the demo. Every security-relevant one is given explicitly, so
    Gradio's environment variables (`GRADIO_SERVER_NAME`, `GRADIO_SHARE`, `GRADIO_MCP_SERVER`, ...) cannot widen them."""
    return {
        "server_name": host or DEFAULT_HOST,
        "server_port": port,
        "share": bool(share),
        "allowed_paths": [str(outputs_dir)],
        "blocked_paths": [str(examples_cache_dir())],
        "max_file_size": MAX_FILE_SIZE,
        "show_error": False,  # an unexpected exception shows "Error", not its text; ours are gr.Error messages
        "enable_monitoring": False,
        "mcp_server": False,
        "ssr_mode": False,
        "run_history": False,
        "strict_cors": True,
        "quiet": True,
        "prevent_thread_lock": True,
    }
