"""Safe file writing and reading for every artifact smt produces (selections, deltas).

Writes go to a temporary name in the same folder, are fsynced, then renamed over the target, so a
crash mid-write never leaves a half-written file under the real name. Reads use safetensors (no code
execution) and turn every failure into a one-line ``ValueError`` that names the file.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class WriteFailedError(OSError):
    """A file could not be written (full disk, no permission); the previous file under that name is intact."""


def atomic_write(path: Path, write: Callable[[str], None], what: str = "file") -> Path:
    """Run ``write(temporary_name)``, fsync it, then rename it over ``path`` and fsync the folder.

    Readers see the old file or the complete new one, never a partial one; on any failure the temporary
    file is removed and the old file is left as it was.

    Raises:
        WriteFailedError: the write, fsync or rename failed (e.g. ``ENOSPC``), with a one-line reason.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode a plain open() would
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        reason = err.strerror or (str(err).splitlines() or [type(err).__name__])[0]
        raise WriteFailedError(
            err.errno, f"{what} {path} was not written ({reason}); the previous one is intact — free space and retry"
        ) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    _remove_stale_temporaries(path)
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of ``path`` left by a process killed mid-write (this write just succeeded, so none is live)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` with ``metadata`` to ``path`` atomically (temp file, fsync, rename)."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(Path(path), lambda tmp: save_file(cpu, tmp, metadata=metadata), "safetensors file")


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


MAX_DIMENSION = 2**31  # a weight dimension beyond this is damage, not a model


def parse_grids(text: str | None, where: str) -> dict:
    """``{module: BlockGrid}`` from a file's ``grids`` metadata (JSON ``{name: [out, in, bo, bi]}``), validated.

    Raises:
        ValueError: not JSON, not an object of four positive integers per module; the message names ``where``.
    """
    from smt.kernels.blocks import BlockGrid

    grids = parse_json(text, where, "grids", dict)
    for name, dims in grids.items():
        if not (isinstance(dims, list) and len(dims) == 4 and all(_is_dimension(d) for d in dims)):
            raise ValueError(f"{where}: grid of {name!r} is {dims!r}, not four positive integers; re-create the file")
    return {name: BlockGrid(*dims) for name, dims in grids.items()}


def _is_dimension(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_DIMENSION


def parse_json(text: str | None, where: str, field: str, kind: type):
    """The JSON value of metadata ``field``, which must be a ``kind``; one-line ``ValueError`` naming ``where``."""
    import json

    if text is None:
        raise ValueError(f"{where}: metadata has no {field!r}; the file was not written by smt")
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{where}: metadata {field!r} is not valid JSON ({err}); re-create the file") from None
    if not isinstance(value, kind):
        raise ValueError(f"{where}: metadata {field!r} is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def parse_count(text, where: str, field: str) -> int:
    """A non-negative integer metadata field (missing = 0)."""
    try:
        value = int(text or 0)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: metadata {field!r}={text!r} is not an integer; re-create the file") from None
    if value < 0:
        raise ValueError(f"{where}: metadata {field!r}={value} is negative; re-create the file")
    return value
