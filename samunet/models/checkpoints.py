"""Finding, hashing and safely reading encoder checkpoints.

SAM checkpoints are never downloaded. They are looked up, in this order:

1. the `checkpoint` argument of `build_encoder` (a file, or a folder holding the official file name);
2. the per-model environment variable (`SAMUNET_SAM_VIT_B_CHECKPOINT`, `SAMUNET_SAM_VIT_L_CHECKPOINT`,
   `SAMUNET_SAM_VIT_H_CHECKPOINT`) naming the file;
3. the official file name inside the folder named by `SAMUNET_SAM_CHECKPOINT_DIR`.

Every checkpoint is read with `torch.load(..., weights_only=True)`: only tensors and plain containers are
accepted, never pickled code.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch

SAM_CHECKPOINT_DIR_ENV = "SAMUNET_SAM_CHECKPOINT_DIR"
SAM_CHECKPOINT_ENV = {
    "sam_vit_b": "SAMUNET_SAM_VIT_B_CHECKPOINT",
    "sam_vit_l": "SAMUNET_SAM_VIT_L_CHECKPOINT",
    "sam_vit_h": "SAMUNET_SAM_VIT_H_CHECKPOINT",
}
SAM_OFFICIAL_FILENAMES = {
    "sam_vit_b": "sam_vit_b_01ec64.pth",
    "sam_vit_l": "sam_vit_l_0b3195.pth",
    "sam_vit_h": "sam_vit_h_4b8939.pth",
}
SAM_DOWNLOAD_PAGE = "https://github.com/facebookresearch/segment-anything#model-checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the network it was given to."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


def sha256_file(path: str | os.PathLike) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Hash of tensor names, shapes, dtypes and values (for weights that exist only in memory)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16
                      else tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _where_to_put(name: str) -> str:
    return (f"Put the official file {SAM_OFFICIAL_FILENAMES[name]} (from {SAM_DOWNLOAD_PAGE}) into the folder "
            f"named by ${SAM_CHECKPOINT_DIR_ENV}, or point ${SAM_CHECKPOINT_ENV[name]} at the file, or pass "
            f"checkpoint=<path> to build_encoder.")


def resolve_sam_checkpoint(name: str, checkpoint: str | os.PathLike | None = None) -> Path:
    """Path of the checkpoint for SAM encoder `name`; raises CheckpointNotFoundError saying where to put it."""
    official = SAM_OFFICIAL_FILENAMES[name]
    tried = []
    candidates: list[tuple[str, Path]] = []
    if checkpoint is not None:
        given = Path(checkpoint).expanduser()
        candidates.append(("checkpoint argument", given / official if given.is_dir() else given))
    else:
        per_model = os.environ.get(SAM_CHECKPOINT_ENV[name])
        if per_model:
            candidates.append((f"${SAM_CHECKPOINT_ENV[name]}", Path(per_model).expanduser()))
        folder = os.environ.get(SAM_CHECKPOINT_DIR_ENV)
        if folder:
            candidates.append((f"${SAM_CHECKPOINT_DIR_ENV}", Path(folder).expanduser() / official))
    for origin, path in candidates:
        if path.is_file():
            return path
        tried.append(f"{path} (from {origin})")
    if not tried:
        raise CheckpointNotFoundError(
            f"No checkpoint for encoder '{name}': no checkpoint argument and neither ${SAM_CHECKPOINT_ENV[name]} "
            f"nor ${SAM_CHECKPOINT_DIR_ENV} is set. {_where_to_put(name)} samunet never falls back to random "
            f"weights.")
    raise CheckpointNotFoundError(
        f"No checkpoint for encoder '{name}': not found at {'; '.join(tried)}. {_where_to_put(name)} "
        f"samunet never falls back to random weights.")


def load_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely and return its flat state dict ('model' / 'state_dict' wrappers removed)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"Checkpoint for {what} not found: {path}") from None
    except Exception as error:  # corrupt file, truncated download, pickled objects refused by weights_only
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"Could not read {path} as a checkpoint for {what} ({type(error).__name__}: {first_line}). The file "
            f"is corrupt, truncated, or not a plain tensor checkpoint (only tensors are loaded, never pickled "
            f"code); replace it with the original file.") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors, so it is no checkpoint for {what}.")
    return state


def split_prefixes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...], source: str,
                   what: str) -> dict[str, dict[str, torch.Tensor]]:
    """Split 'image_encoder.x', 'prompt_encoder.y', ... into one dict per prefix; every prefix must appear."""
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in parts:
            parts[head][rest] = value
    missing = [p for p in prefixes if not parts[p]]
    if missing:
        raise CheckpointError(
            f"{source} is not a checkpoint for {what}: it has no '{missing[0]}.*' weights "
            f"(found prefixes: {sorted({k.partition('.')[0] for k in state})[:8]}).")
    return parts


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, what: str,
              assign: bool = False) -> None:
    """Strict load with an error that names the checkpoint and the first mismatches."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
                   for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        details = []
        if wrong_shape:
            details.append(f"{len(wrong_shape)} shape mismatches, e.g. {wrong_shape[0]}")
        if missing:
            details.append(f"{len(missing)} missing weights, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected weights, e.g. {unexpected[0]}")
        raise CheckpointError(f"{source} does not fit {what}: {'; '.join(details)}. Is it the checkpoint of "
                              f"another model?")
    module.load_state_dict(state, strict=True, assign=assign)
    leftovers = [name for name, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{source} left {what} without weights for {leftovers[:3]}")
