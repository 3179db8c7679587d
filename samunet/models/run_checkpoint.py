"""Checkpoints: the head's weights plus what identifies the run, written atomically, loaded safely.

A checkpoint never contains the frozen encoder again, only its identity (name, input size, weights hash), so it
stays small; loading checks that identity against the encoder in use.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from samunet.utils import SamunetError, atomic_write_bytes

FORMAT = "samunet-checkpoint-1"


def save_checkpoint(state: dict, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        raise SamunetError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise SamunetError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise SamunetError(f"{path}: not a readable samunet checkpoint (empty file, 0 bytes; the run that wrote it "
                           "was probably stopped or the disk was full)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():  # holds pickled objects: never loaded, whatever PyTorch suggests
            raise SamunetError(f"{path}: not a samunet checkpoint: it holds Python objects besides tensors and "
                               "plain values, which samunet never loads (it could run code); use a checkpoint "
                               "written by samunet_train") from None
        raise SamunetError(f"{path}: not a readable samunet checkpoint (corrupt or foreign file: "
                           f"{_first_line(e)})") from None
    except Exception as e:  # truncated file, not a torch file
        raise SamunetError(f"{path}: not a readable samunet checkpoint (corrupt or foreign file: "
                           f"{_first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SamunetError(f"{path}: not a samunet checkpoint (format {found!r}, expected {FORMAT})")
    return state


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def check_compatible(state: dict, path, expected: dict) -> None:
    """Raise a clear error if the checkpoint belongs to another data set, configuration, head or encoder."""
    problems = []
    for key, want in expected.items():
        have = state.get(key)
        if have == want:
            continue
        if key == "encoder_identity" and isinstance(have, dict) and isinstance(want, dict) and \
                {**have, "numerics": None} == {**want, "numerics": None}:
            problems.append(f"its head was trained on {have.get('numerics')} embeddings, and this encoder computes "
                            f"{want.get('numerics')} ones (the plans' encoder cpu_precision on a CPU, float32 on a "
                            "GPU decide which); use the encoder it was trained with")
            continue
        problems.append(f"{key} is {have!r}, expected {want!r}")
    if problems:
        raise SamunetError(f"{path}: checkpoint does not belong to this run: " + "; ".join(problems))
