"""Files written whole or not at all: a temporary name in the target's folder, then a rename.

A write that fails (a full disk, a quota, SIGTERM) removes its temporary file and raises an ``OSError`` that
names the target, so that the run ends with one line and a folder it can resume from.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np


def write_atomically(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``.

    Raises
    ------
    OSError
        With ``filename`` set to ``path`` when the write failed without naming a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_npz(path, **arrays) -> Path:
    """Save arrays as an uncompressed ``.npz`` atomically; None values are skipped.

    Unlike ``np.savez``, the archive is closed when a write fails (an unclosed one retries its last write when it
    is garbage-collected and prints a second error)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, value in arrays.items():
                if value is None:
                    continue
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)

    return write_atomically(path, write)
