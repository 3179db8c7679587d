"""``samunet_install_pretrained_model_from_zip``: install models exported by ``samunet_export_model_to_zip``.

Before anything is written the zip is checked: every entry must be a plain file below the data set's folder (no
absolute path, no ``..``, no link), the encoder each model reads must be available here with the very weights it
was trained on (same SHA-256), and each checkpoint must name that encoder. The files are unpacked into a staging
folder inside ``samunet_results`` and then renamed into place; a file that exists already with other content is
never replaced unless ``overwrite`` is given (identical files are left as they are).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from samunet.paths import dataset_id_from_name, results_folder
from samunet.sharing.export_zip import FORMAT, MANIFEST
from samunet.models.run_checkpoint import load_checkpoint
from samunet.utils import SamunetError, check_writable_folder

logger = logging.getLogger("samunet")


def entry_problem(info: zipfile.ZipInfo, dataset_name: str) -> str | None:
    """Why a zip entry may not be unpacked into ``samunet_results`` (None when it may)."""
    name = info.filename
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute or Windows path"
    parts = PurePosixPath(name).parts
    if ".." in parts or "." in parts:
        return "a path with '..' that would land outside samunet_results"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    if name != MANIFEST and (not parts or parts[0] != dataset_name or (len(parts) < 2 and not info.is_dir())):
        return f"outside the data set folder {dataset_name}/"
    return None


def local_encoder_hash(encoder: dict, checkpoint: str | None) -> tuple[str, str | None]:
    """(SHA-256 of the weights this machine would build ``encoder`` from, the file when one is needed)."""
    from samunet.models.checkpoints import CheckpointError
    from samunet.models.encoders import ENCODER_NAMES, checkpoint_hash
    from samunet.models.lite_medsam import packaged_checkpoint
    name = encoder["name"]
    if name not in ENCODER_NAMES:
        raise SamunetError(f"encoder '{name}' is not available in this samunet (known: {', '.join(ENCODER_NAMES)})")
    try:
        if name.startswith("sam_vit"):
            from samunet.models.checkpoints import resolve_sam_checkpoint
            path = resolve_sam_checkpoint(name, checkpoint)
            return checkpoint_hash(path), str(path.resolve())
        if name == "lite_medsam":
            path = checkpoint or packaged_checkpoint()
            return checkpoint_hash(path), str(Path(checkpoint).resolve()) if checkpoint else None
        return checkpoint_hash(name), None
    except (CheckpointError, FileNotFoundError) as e:
        raise SamunetError(f"encoder '{name}' needed by the model is not available here: {e}") from None


def install_model_from_zip(zip_file, overwrite: bool = False, encoder_checkpoint: str | None = None) -> dict:
    """Install the models of ``zip_file`` into ``samunet_results``. ``encoder_checkpoint``: a local weights file
    for the encoder (SAM ViT, or a LiteMedSAM-format file other than the packaged one). Returns the manifest."""
    zip_file = Path(zip_file)
    if not zip_file.is_file():
        raise SamunetError(f"{zip_file}: file not found")
    try:
        z = zipfile.ZipFile(zip_file)
    except (zipfile.BadZipFile, OSError) as e:
        raise SamunetError(f"{zip_file}: not a readable zip file ({e})") from None
    with z:
        try:
            manifest = json.loads(z.read(MANIFEST))
        except KeyError:
            raise SamunetError(f"{zip_file}: no {MANIFEST}; not a model exported by samunet_export_model_to_zip") \
                from None
        except (ValueError, zipfile.BadZipFile) as e:
            raise SamunetError(f"{zip_file}: {MANIFEST} cannot be read ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SamunetError(f"{zip_file}: {MANIFEST} is not format {FORMAT}")
        dataset = str(manifest.get("dataset_name"))
        dataset_id_from_name(dataset)
        bad = [f"{i.filename!r}: {p}" for i in z.infolist() if (p := entry_problem(i, dataset))]
        if bad:
            raise SamunetError(f"{zip_file}: refused, nothing was installed; unsafe entries:\n  - "
                               + "\n  - ".join(bad))
        local_files = _check_encoders(zip_file, manifest, encoder_checkpoint)
        root = check_writable_folder(results_folder(), "samunet_results")
        root.mkdir(parents=True, exist_ok=True)
        stage = root / f".install-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            members = [i for i in z.infolist() if not i.is_dir() and i.filename != MANIFEST]
            for info in members:
                target = stage / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with z.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    raise SamunetError(f"{zip_file}: entry {info.filename} is corrupt ({e}); nothing was "
                                       "installed") from None
            _check_checkpoints(zip_file, stage, manifest)
            _point_plans_at_local_weights(stage, manifest, local_files)
            return _move_into_place(stage, root, members, overwrite, zip_file, manifest)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _check_encoders(zip_file: Path, manifest: dict, checkpoint: str | None) -> dict:
    local_files = {}
    for model in manifest.get("models", []):
        enc = model.get("encoder")
        if enc is None:  # a model that reads images only (the from-scratch U-Net)
            continue
        have, path = local_encoder_hash(enc, checkpoint)
        if have != enc["weights_sha256"]:
            raise SamunetError(f"{zip_file}: {model['folder']} was trained on encoder '{enc['name']}' with weights "
                               f"SHA-256 {enc['weights_sha256'][:16]}..., but the weights here differ "
                               f"({have[:16]}...); nothing was installed. Pass --checkpoint with the file it was "
                               f"trained on ({enc.get('checkpoint_file') or 'the packaged one'})")
        local_files[model["folder"]] = path
    return local_files


def _check_checkpoints(zip_file: Path, stage: Path, manifest: dict) -> None:
    for model in manifest["models"]:
        enc = model.get("encoder")
        for fold in model["folds"]:
            for chk in manifest["checkpoints"]:
                path = stage / model["folder"] / f"fold_{fold}" / chk
                state = load_checkpoint(path)
                identity = state.get("encoder_identity")
                got = None if identity is None else (identity["encoder"], identity["input_size"],
                                                     identity["weights_sha256"])
                want = None if enc is None else (enc["name"], enc["input_size"], enc["weights_sha256"])
                if got != want:
                    raise SamunetError(f"{zip_file}: {model['folder']}/fold_{fold}/{chk} names encoder {got}, "
                                       f"the manifest {want}; nothing was installed")


def _point_plans_at_local_weights(stage: Path, manifest: dict, local_files: dict) -> None:
    """Plans name the exporting machine's weights file; here the file found (and hashed) locally is used."""
    for model in manifest["models"]:
        plans_file = stage / model["folder"] / "plans.json"
        plans = json.loads(plans_file.read_text())
        if plans.get("encoder", {}).get("checkpoint") and local_files.get(model["folder"]) != \
                plans["encoder"]["checkpoint"]:
            plans["encoder"]["checkpoint"] = local_files.get(model["folder"])
            plans_file.write_text(json.dumps(plans, indent=2) + "\n")


def _move_into_place(stage: Path, root: Path, members, overwrite: bool, zip_file: Path, manifest: dict) -> dict:
    conflicts, moves = [], []
    for info in members:
        new, target = stage / info.filename, root / info.filename
        if target.is_dir():
            raise SamunetError(f"{target}: is a folder where the zip has a file; nothing was installed")
        if target.is_file() and target.read_bytes() == new.read_bytes():
            continue
        if target.exists():
            conflicts.append(target)
        moves.append((new, target))
    if conflicts and not overwrite:
        shown = "\n  - ".join(str(c) for c in conflicts[:10])
        raise SamunetError(f"{zip_file}: {len(conflicts)} file(s) of an installed model would be replaced; nothing "
                           f"was installed (pass --overwrite to replace them):\n  - {shown}")
    for new, target in moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, target)
    logger.info("installed %d model folder(s) of %s into %s (%d file(s) new or replaced)", len(manifest["models"]),
                manifest["dataset_name"], root / manifest["dataset_name"], len(moves))
    return manifest
