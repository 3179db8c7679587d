"""Is an image file complete? SimpleITK fills the missing part of a truncated file with zeros and says nothing.

- gzip-compressed files (``.nii.gz``, ``.gipl.gz``): the whole stream is decompressed (without keeping it) and
  its end marker, CRC-32 and length are checked, as ``gzip -t`` does.
- uncompressed NIfTI-1 (``.nii``): the file must hold the header's voxel offset plus every voxel the header
  declares.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from samunet.utils import SamunetError

_CHUNK = 1 << 20


def _check_gzip(path: Path) -> None:
    size = 0
    with open(path, "rb") as f:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        members = 0
        data = f.read(_CHUNK)
        try:
            while data:
                size += len(d.decompress(data))
                if d.eof:  # one gzip member done; another may follow
                    members += 1
                    rest = d.unused_data
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    data = rest if rest.strip(b"\0") else f.read(_CHUNK)
                    continue
                data = f.read(_CHUNK)
        except zlib.error as e:
            raise SamunetError(f"{path}: cannot be read: corrupt gzip data ({e}); the file is damaged, "
                              "replace it") from None
    if members == 0:
        raise SamunetError(f"{path}: cannot be read: truncated file (the gzip stream ends after {size} "
                           "decompressed bytes, without its end marker and checksum); the file is incomplete, "
                           "replace it")


def _check_nifti1(path: Path) -> None:
    with open(path, "rb") as f:
        header = f.read(348)
    if len(header) < 348:
        return  # too short for a header: the reader reports it
    for endian in "<>":
        if struct.unpack(endian + "i", header[:4])[0] == 348:
            break
    else:
        return  # NIfTI-2 or not NIfTI: left to the reader
    dim = struct.unpack(endian + "8h", header[40:56])
    bitpix = struct.unpack(endian + "h", header[72:74])[0]
    vox_offset = struct.unpack(endian + "f", header[108:112])[0]
    if not 1 <= dim[0] <= 7 or bitpix <= 0:
        return
    expected = int(vox_offset) + int(np.prod([max(1, d) for d in dim[1:dim[0] + 1]], dtype=np.int64)) * bitpix // 8
    actual = path.stat().st_size
    if actual < expected:
        raise SamunetError(f"{path}: cannot be read: truncated file ({actual} bytes, but its header declares "
                           f"{expected}); the file is incomplete, replace it")


def check_complete(path: str | Path) -> None:
    """Raise :class:`SamunetError` naming ``path`` if the file is truncated or its compressed data are corrupt."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        _check_gzip(path)
    elif name.endswith(".nii"):
        _check_nifti1(path)
