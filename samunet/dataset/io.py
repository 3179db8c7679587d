"""Reading and writing images and label maps.

Arrays are in numpy (SimpleITK) axis order: images are ``(C, Z, Y, X)`` and label maps ``(Z, Y, X)``. 2D files
get a leading axis of size 1. Geometry travels in a properties dict:

- ``io``: ``"sitk"`` (NIfTI, NRRD, MHA, ... read by SimpleITK) or ``"natural2d"`` (PNG, BMP, TIFF, JPEG)
- ``spacing``: per axis of the array, ``(z, y, x)``; 2D images get 999 on the dummy axis as in nnU-Net
- ``origin`` and ``direction``: as SimpleITK reports them (physical x, y, z order)
- ``dims``: 2 or 3, the dimensionality of the file itself
- ``shape``: ``(Z, Y, X)``

RGB(A)-free natural images with several colour channels yield several channels from one file, as in nnU-Net.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samunet.dataset.completeness import check_complete
from samunet.utils import SamunetError

NATURAL_2D_ENDINGS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gipl", ".gipl.gz")
SUPPORTED_ENDINGS = NATURAL_2D_ENDINGS + SITK_ENDINGS


def _ending(path: Path) -> str:
    name = path.name.lower()
    for e in sorted(SUPPORTED_ENDINGS, key=len, reverse=True):
        if name.endswith(e):
            return e
    return path.suffix.lower()


def check_file_ending(file_ending: str) -> None:
    if file_ending.lower() not in SUPPORTED_ENDINGS:
        raise SamunetError(f"file ending '{file_ending}' is not supported; use one of {', '.join(SUPPORTED_ENDINGS)}")


def _read_sitk(path: Path) -> sitk.Image:
    if path.is_dir():
        raise SamunetError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        raise SamunetError(f"{path}: file not found")
    check_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reason"
        raise SamunetError(f"{path}: cannot be read as an image ({first})") from None


def _read_one(path: Path) -> tuple[np.ndarray, dict]:
    """One file -> (C, Z, Y, X) float32 array and its properties."""
    img = _read_sitk(path)
    ncomp = img.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayFromImage(img)
    dims = img.GetDimension()
    if dims not in (2, 3):
        raise SamunetError(f"{path}: {dims}D images are not supported here (4D MSD files: use samunet_convert_msd)")
    if ncomp > 1:
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    if dims == 2:
        arr = arr[:, None]
    natural = _ending(path) in NATURAL_2D_ENDINGS and dims == 2
    if natural and ncomp == 4:
        raise SamunetError(f"{path}: RGBA image; save it without the alpha channel (RGB or grey)")
    spacing_xyz = list(img.GetSpacing())
    if dims == 2:
        spacing = [999.0, spacing_xyz[1], spacing_xyz[0]]
        if natural:
            spacing = [999.0, 1.0, 1.0]
    else:
        spacing = spacing_xyz[::-1]
    props = {
        "io": "natural2d" if natural else "sitk",
        "dims": dims,
        "spacing": [float(s) for s in spacing],
        "origin": [float(o) for o in img.GetOrigin()],
        "direction": [float(d) for d in img.GetDirection()],
        "shape": list(arr.shape[1:]),
        "dtype": str(arr.dtype),
    }
    return arr, props


def read_images(files: list[str | Path]) -> tuple[np.ndarray, dict]:
    """Read all channel files of one case into a ``(C, Z, Y, X)`` float32 array.

    Channels of every file are concatenated in file order. All files must share shape and geometry.
    """
    arrays, props = [], None
    for f in files:
        f = Path(f)
        a, p = _read_one(f)
        if props is None:
            props = p
            props["files"] = [str(f)]
        else:
            problem = geometry_mismatch(props, p)
            if problem:
                raise SamunetError(f"{f}: geometry differs from {props['files'][0]} ({problem})")
            props["files"].append(str(f))
        arrays.append(a)
    if props is None:
        raise SamunetError("no image files given")
    data = np.concatenate(arrays, 0).astype(np.float32, copy=False)
    props["channels_per_file"] = [int(a.shape[0]) for a in arrays]
    return data, props


def read_seg(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read a label map into a ``(Z, Y, X)`` integer array."""
    path = Path(path)
    arr, props = _read_one(path)
    if arr.shape[0] != 1:
        raise SamunetError(f"{path}: a label map must have one channel, found {arr.shape[0]}")
    arr = arr[0]
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise SamunetError(f"{path}: label map contains NaN or Inf")
        rounded = np.round(arr)
        if not np.array_equal(rounded, arr):
            raise SamunetError(f"{path}: label map contains non-integer values")
        arr = rounded
    if arr.min() < 0 or arr.max() > 32767:
        raise SamunetError(f"{path}: label values must lie in 0..32767, found {arr.min().item()}..{arr.max().item()}")
    props["files"] = [str(path)]
    return arr.astype(np.int16), props


def _numbers(values) -> tuple:
    """Plain Python numbers for messages: ``(1.0, -1.0)``, not ``(np.float64(1.0), np.float64(-1.0))``."""
    return tuple(float(v) for v in np.round(np.asarray(values, float), 4))


def geometry_mismatch(a: dict, b: dict, rtol: float = 1e-3, atol: float = 1e-3) -> str | None:
    """Describe how two properties dicts disagree in geometry, or None when they agree within tolerance."""
    if list(a["shape"]) != list(b["shape"]):
        return f"shape {tuple(a['shape'])} vs {tuple(b['shape'])}"
    for key in ("spacing", "origin", "direction"):
        va, vb = np.asarray(a[key], float), np.asarray(b[key], float)
        if va.shape != vb.shape or not np.allclose(va, vb, rtol=rtol, atol=atol):
            return f"{key} {_numbers(va)} vs {_numbers(vb)}"
    return None


def write_seg(seg: np.ndarray, props: dict, path: str | Path) -> None:
    """Write a ``(Z, Y, X)`` label map with the geometry recorded in ``props`` (as read from the image)."""
    path = Path(path)
    seg = np.asarray(seg)
    if tuple(seg.shape) != tuple(props["shape"]):
        raise ValueError(f"label map shape {seg.shape} does not match the image shape {tuple(props['shape'])}")
    dtype = np.uint8 if seg.max(initial=0) < 256 else np.uint16
    arr = seg.astype(dtype)
    if props["dims"] == 2:
        arr = arr[0]
    img = sitk.GetImageFromArray(arr)
    if props["io"] == "sitk":
        dims = props["dims"]
        img.SetSpacing([float(s) for s in props["spacing"][::-1][:dims]])
        img.SetOrigin(props["origin"])
        img.SetDirection(props["direction"])
    path.parent.mkdir(parents=True, exist_ok=True)
    # write next to the target, then rename, so a killed run never leaves half a file under the final name
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.partial{_ending(path)}")
    try:
        sitk.WriteImage(img, str(tmp), True)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
