"""What a file is, from its first bytes: for messages about a file given to the wrong option (a PNG as the Inception
weights or as the reference statistics), instead of the loader's own advice, which assumes the right kind of file."""

from __future__ import annotations

import zipfile
from pathlib import Path

PYTORCH, NPZ, SAFETENSORS = "a PyTorch file (torch.save)", "a NumPy .npz archive", "a safetensors file"
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x93NUMPY", "a NumPy .npy array (one array, not an .npz archive)"),
    (b"\x80", PYTORCH),  # a pickle: torch.save's legacy format
)


def describe_file(path: str | Path) -> str | None:
    """`"a PNG image"`, `"an empty file"`, `PYTORCH`, `NPZ`, ... for an existing file; None when not recognised."""
    with open(path, "rb") as file:
        head = file.read(512)
    if not head:
        return "an empty file"
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if head.startswith(b"PK\x03\x04"):  # torch.save and np.savez both write zip archives
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "a damaged zip archive"
        if any(name.endswith("data.pkl") for name in names):
            return PYTORCH
        return NPZ if names and all(name.endswith(".npy") for name in names) else "a zip archive"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        return SAFETENSORS  # 8 bytes of header length, then the JSON header
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return "a text file"
        except UnicodeDecodeError:
            pass
    return None
