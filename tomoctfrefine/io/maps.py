"""MRC maps and images: half maps, masks, tilt stacks (``mrcfile``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import mrcfile
import numpy as np

from .atomic import write_atomically
from ..errors import InputError, Problem

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class MapHeader:
    """What the header of an MRC file says, read without the data.

    Attributes
    ----------
    path : Path
    shape : tuple of int
        ``(nz, ny, nx)`` (numpy order; for a tilt stack ``nz`` is the number of tilts).
    voxel_size_angstrom : float
        The x voxel size (Å).
    dtype : numpy.dtype
        Data type of the voxels.
    data_offset_bytes : int
        Where the data start (1024 + extended header).
    file_size_bytes : int
        Size of the file on disk.
    """

    path: Path
    shape: tuple
    voxel_size_angstrom: float
    dtype: np.dtype
    data_offset_bytes: int
    file_size_bytes: int

    @property
    def expected_size_bytes(self) -> int:
        """File size implied by the header."""
        return self.data_offset_bytes + int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def size_matches(self) -> bool:
        """True when the file is at least as long as the header says (a truncated stack is not)."""
        return self.file_size_bytes >= self.expected_size_bytes


def _unreadable(path: PathLike, error: Exception) -> InputError:
    reason = "file not found" if isinstance(error, FileNotFoundError) else f"not a readable MRC file ({error})"
    fix = "check the path" if isinstance(error, FileNotFoundError) else "check the file is a complete MRC file"
    return InputError([Problem(str(path), reason, fix)])


def read_map_header(path: PathLike) -> MapHeader:
    """Read the header of an MRC file (fast: no data).

    Raises
    ------
    InputError
        If the file is missing or its header is not MRC.
    """
    path = Path(path)
    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
            header = mrc.header
            if header is None:
                raise ValueError("no MRC header")
            dtype = mrcfile.utils.data_dtype_from_header(header)
            shape = (int(header.nz), int(header.ny), int(header.nx))
            voxel = float(mrc.voxel_size.x)
            offset = 1024 + int(header.nsymbt)
    except Exception as error:  # mrcfile raises ValueError/OSError/others on bad headers
        raise _unreadable(path, error) from None
    return MapHeader(path, shape, voxel, dtype, offset, path.stat().st_size)


def read_map(path: PathLike) -> tuple[np.ndarray, float]:
    """Read an MRC map or image stack.

    Returns
    -------
    data : numpy.ndarray
        float32 array ``[z, y, x]`` (an in-memory copy).
    voxel_size_angstrom : float
        The x voxel size from the header.
    """
    try:
        with mrcfile.open(path, mode="r", permissive=True) as mrc:
            if mrc.data is None:
                raise ValueError("no data")
            return np.array(mrc.data, dtype=np.float32), float(mrc.voxel_size.x)
    except Exception as error:
        raise _unreadable(path, error) from None


def memmap_stack(path: PathLike) -> np.ndarray:
    """Memory-map an MRC stack read-only as ``[z, y, x]`` (its own dtype; nothing is copied)."""
    header = read_map_header(path)
    if not header.size_matches:
        raise InputError([Problem(str(path), f"file is shorter than its header says ({header.file_size_bytes} < {header.expected_size_bytes} bytes)", "the file is truncated: copy it again")])
    return np.memmap(path, dtype=header.dtype, mode="r", offset=header.data_offset_bytes, shape=header.shape)


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped array (e.g. :func:`memmap_stack`) from this
    process: read once, a mapped tilt stack otherwise stays in the resident set whole (172 MB for
    41 tilts of 1024²) although the tilts are used one at a time. The file's pages stay in the page
    cache, so a later read costs no disk access. Nothing happens for other arrays."""
    import mmap

    handle = getattr(array, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            handle.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def write_map(path: PathLike, data: np.ndarray, voxel_size_angstrom: float) -> Path:
    """Write a float32 MRC file atomically (temporary file in the same folder, then ``os.replace``)."""
    def write(tmp: Path) -> None:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            mrc.voxel_size = float(voxel_size_angstrom)
            if np.asarray(data).ndim == 3:
                mrc.header.ispg = 1 if data.shape[0] > 1 else 0

    return write_atomically(path, write)
