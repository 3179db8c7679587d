"""Convert a Medical Segmentation Decathlon task folder (``TaskXX_Name``) to an nnU-Net v2 raw data set.

4D multi-channel NIfTI images are split into one file per channel (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...)
with the spatial geometry of the first three axes; labels are copied; ``dataset.json`` is rewritten in the v2
form (``channel_names``, ``labels`` as name -> value, ``file_ending``).
"""
from __future__ import annotations

import logging
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samunet.paths import raw_folder
from samunet.utils import SamunetError, load_json, save_json

logger = logging.getLogger("samunet")


def _split_image(src: Path, dst_prefix: Path) -> int:
    try:
        img = sitk.ReadImage(str(src))
    except RuntimeError as e:
        raise SamunetError(f"{src}: cannot be read ({str(e).strip().splitlines()[-1]})") from None
    if img.GetDimension() == 3:
        outs = [img]
    elif img.GetDimension() == 4:
        arr = sitk.GetArrayFromImage(img)  # (T, Z, Y, X)
        direction = np.array(img.GetDirection()).reshape(4, 4)[:3, :3].ravel().tolist()
        outs = []
        for t in range(arr.shape[0]):
            o = sitk.GetImageFromArray(arr[t])
            o.SetSpacing(img.GetSpacing()[:3])
            o.SetOrigin(img.GetOrigin()[:3])
            o.SetDirection(direction)
            outs.append(o)
    else:
        raise SamunetError(f"{src}: expected a 3D or 4D image, found {img.GetDimension()}D")
    for c, o in enumerate(outs):
        target = Path(f"{dst_prefix}_{c:04d}.nii.gz")
        tmp = target.with_name("." + target.name)
        sitk.WriteImage(o, str(tmp), True)
        tmp.replace(target)
    return len(outs)


def convert_msd(task_folder: str | Path, overwrite_id: int | None = None, num_processes: int = 2) -> Path:
    task_folder = Path(task_folder)
    m = re.match(r"^Task(\d+)_(.+)$", task_folder.name)
    if not m:
        raise SamunetError(f"{task_folder}: expected an MSD task folder named TaskXX_Name")
    dataset_id = overwrite_id if overwrite_id is not None else int(m.group(1))
    name = f"Dataset{dataset_id:03d}_{m.group(2)}"
    meta = load_json(task_folder / "dataset.json")
    for key in ("modality", "labels"):
        if key not in meta:
            raise SamunetError(f"{task_folder / 'dataset.json'}: missing key '{key}' (is this an MSD task?)")
    out = raw_folder() / name
    if out.exists():
        raise SamunetError(f"{out} already exists; remove it or choose another id with -overwrite_id")
    jobs = []
    for sub in ("imagesTr", "imagesTs"):
        src_dir = task_folder / sub
        if not src_dir.is_dir():
            continue
        (out / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted(src_dir.glob("*.nii.gz")):
            if not f.name.startswith("."):
                jobs.append((f, out / sub / f.name[: -len(".nii.gz")]))
    if not jobs:
        raise SamunetError(f"{task_folder}: no .nii.gz images in imagesTr or imagesTs")
    with ProcessPoolExecutor(max(1, num_processes)) as ex:
        channels = set(ex.map(_split_image, [j[0] for j in jobs], [j[1] for j in jobs]))
    if channels != {len(meta["modality"])}:
        raise SamunetError(f"{task_folder}: images have {sorted(channels)} channel(s) but dataset.json declares "
                           f"{len(meta['modality'])}")
    labels_src = task_folder / "labelsTr"
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    n_train = 0
    for f in sorted(labels_src.glob("*.nii.gz")):
        if not f.name.startswith("."):
            shutil.copyfile(f, out / "labelsTr" / f.name)
            n_train += 1
    save_json({
        "channel_names": {str(k): v for k, v in meta["modality"].items()},
        "labels": {v: int(k) for k, v in meta["labels"].items()},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": meta.get("name", m.group(2)),
        "reference": meta.get("reference", ""),
        "licence": meta.get("licence", ""),
        "converted_from": task_folder.name,
    }, out / "dataset.json")
    logger.info("converted %s to %s (%d training cases)", task_folder.name, out, n_train)
    return out
