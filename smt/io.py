"""Safe file writing and reading for every artifact smt produces (selections, deltas).

Writes go to a temporary name in the same folder, are fsynced, then renamed over the target, so a
crash mid-write never leaves a half-written file under the real name. Reads use safetensors (no code
execution) and turn every failure into a one-line ``ValueError`` that names the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` with ``metadata`` to ``path`` atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_safetensors(path: Path, fmt: str, version: int, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata of an smt safetensors file, checking its format and version.

    Raises:
        ValueError: missing file, unreadable/truncated file, another format, or a newer format version.
    """
    if not path.is_file():
        raise ValueError(f"{what} file {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            _check_format(metadata, path, fmt, version, what)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{what} file {path} is corrupted or truncated ({reason}); re-create it") from err
    return tensors, metadata


def _check_format(metadata: dict, path: Path, fmt: str, version: int, what: str) -> None:
    if metadata.get("format") != fmt:
        raise ValueError(f"{path} is not an smt {what} file (format {metadata.get('format')!r}, expected {fmt!r})")
    try:
        found = int(metadata.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{what} file {path} has no valid format_version; re-create it") from None
    if found > version:
        raise ValueError(f"{what} file {path} has format version {found}, newer than this smt ({version}); upgrade smt")
