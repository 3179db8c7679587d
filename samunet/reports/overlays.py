"""Overlay PNGs: a case's image with its reference and/or predicted labels, on the slice of largest foreground.

    png = overlay_case(image_file, reference_file=ref, prediction_file=pred, label_values=[0, 1, 2])

A 3D case is cut across its coarsest axis (the first array axis when spacings tie), at the slice where the
reference (else the prediction) has most foreground; the slice is shown at its physical aspect ratio. With both
label maps there are two panels, reference left and prediction right. Each class has a fixed colour (filled,
semi-transparent, with an opaque outline), the same in every image.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from scipy import ndimage

from samunet.dataset.io import read_images, read_seg
from samunet.utils import atomic_write_bytes

MIN_PANEL_PX = 256  # small slices (Hippocampus: about 50 x 35) are enlarged to at least this height


def class_colours(n: int) -> np.ndarray:
    """``(n, 3)`` RGB in [0, 1]: matplotlib's tab10 cycle (class 1 first)."""
    from matplotlib import colormaps
    return np.asarray([colormaps["tab10"](i % 10)[:3] for i in range(n)], np.float32)


def slice_axis(spacing) -> int:
    """The array axis with the coarsest spacing (2D files: axis 0, their dummy axis)."""
    return int(np.argmax(np.round(np.asarray(spacing, float), 6)))


def largest_foreground_slice(seg: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the slice with most non-zero voxels (the middle slice when all are empty)."""
    counts = np.count_nonzero(np.moveaxis(seg, axis, 0).reshape(seg.shape[axis], -1), 1)
    return int(np.argmax(counts)) if counts.any() else seg.shape[axis] // 2


def _grey(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    return np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1).astype(np.float32)


def compose(image: np.ndarray, seg: np.ndarray | None, label_values, alpha: float = 0.45) -> np.ndarray:
    """Grey ``(Y, X)`` image with ``seg``'s classes blended in -> ``(Y, X, 3)`` RGB in [0, 1]."""
    rgb = np.repeat(_grey(image)[..., None], 3, -1)
    if seg is None:
        return rgb
    colours = class_colours(len(label_values))
    for i, v in enumerate(sorted(v for v in label_values if v != 0)):
        mask = seg == v
        if not mask.any():
            continue
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colours[i]
        rgb[mask & ~ndimage.binary_erosion(mask)] = colours[i]
    return rgb


def _physical(panel: np.ndarray, spacing_yx) -> np.ndarray:
    """Nearest-neighbour zoom to square pixels, at least ``MIN_PANEL_PX`` high."""
    sy, sx = (float(s) for s in spacing_yx)
    fy, fx = sy / min(sy, sx), sx / min(sy, sx)
    scale = max(1.0, MIN_PANEL_PX / (panel.shape[0] * fy))
    return ndimage.zoom(panel, (fy * scale, fx * scale, 1), order=0)


def overlay_case(image_file, reference_file=None, prediction_file=None, label_values=(0, 1), channel: int = 0,
                 alpha: float = 0.45) -> tuple[bytes, dict]:
    """PNG bytes of the case's overlay and what it shows (``slice_axis``, ``slice``, ``panels``)."""
    data, props = read_images([image_file])
    image = data[min(channel, data.shape[0] - 1)]
    segs = {name: read_seg(f)[0] for name, f in (("reference", reference_file), ("prediction", prediction_file))
            if f is not None}
    axis = slice_axis(props["spacing"])
    source = segs.get("reference", segs.get("prediction"))
    index = largest_foreground_slice(source, axis) if source is not None else image.shape[axis] // 2
    cut = lambda a: np.take(a, index, axis=axis)  # noqa: E731
    in_plane = [s for a, s in enumerate(props["spacing"]) if a != axis]
    panels = [_physical(compose(cut(image), cut(seg), label_values, alpha), in_plane) for seg in segs.values()] \
        or [_physical(compose(cut(image), None, label_values), in_plane)]
    gap = np.ones((panels[0].shape[0], 4, 3), np.float32)
    canvas = np.concatenate(sum(([p, gap] for p in panels), [])[:-1], 1)
    from matplotlib.image import imsave
    buf = io.BytesIO()
    imsave(buf, np.clip(canvas, 0, 1), format="png")
    return buf.getvalue(), {"slice_axis": axis, "slice": index, "panels": list(segs) or ["image"]}


def write_overlay(path, *args, **kwargs) -> dict:
    png, info = overlay_case(*args, **kwargs)
    atomic_write_bytes(path, png)
    return info


def legend_html(label_values, class_names) -> str:
    """Coloured class names, for the report page."""
    colours = class_colours(len(label_values))
    names = [n for v, n in sorted(zip(label_values, class_names)) if v != 0]
    return " ".join(f'<span style="color:#{"".join(f"{int(c * 255):02x}" for c in colours[i])}">&#9632;</span> {n}'
                    for i, n in enumerate(names))


def plot_overlay_pngs(output_folder, images_folder, file_ending: str, label_values, reference_folder=None,
                      prediction_folder=None, num_processes: int = 2, channel: int = 0, alpha: float = 0.45) -> list:
    """``CASE.png`` in ``output_folder`` for every case of ``images_folder`` (``CASE_0000<ending>``) that has a file
    in the given label folder(s); with neither, the image alone. Returns the case identifiers written."""
    from concurrent.futures import ThreadPoolExecutor
    from samunet.dataset.dataset_json import list_cases
    from samunet.utils import SamunetError, check_writable_folder
    images_folder = Path(images_folder)
    if not images_folder.is_dir():
        raise SamunetError(f"{images_folder}: images folder not found")
    folders = [Path(f) for f in (reference_folder, prediction_folder) if f is not None]
    for f in folders:
        if not f.is_dir():
            raise SamunetError(f"{f}: label folder not found")
    check_writable_folder(output_folder, "the output folder (-o)")
    jobs = []
    for case in list_cases(images_folder, file_ending):
        labels = [None if f is None else Path(f) / f"{case.identifier}{file_ending}"
                  for f in (reference_folder, prediction_folder)]
        if any(p is not None and not p.is_file() for p in labels):
            continue
        jobs.append((case.identifier, case.image_files[0], *labels))
    if not jobs:
        raise SamunetError(f"{images_folder}: no case CASE_0000{file_ending} with a label file in "
                           f"{', '.join(map(str, folders)) or 'the label folders'}")
    Path(output_folder).mkdir(parents=True, exist_ok=True)

    def one(job):
        ident, image, ref, pred = job
        write_overlay(Path(output_folder) / f"{ident}.png", image, ref, pred, label_values, channel, alpha)
        return ident

    with ThreadPoolExecutor(max(1, num_processes)) as ex:
        return list(ex.map(one, jobs))
