"""Checkpoints: the head's weights plus what identifies the run, written atomically, loaded safely.

A checkpoint never contains the frozen encoder again, only its identity (name, input size, weights hash), so it
stays small; loading checks that identity against the encoder in use.
"""
from __future__ import annotations

import io
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
    if not path.is_file():
        raise SamunetError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or objects outside the safe set
        raise SamunetError(f"{path}: not a readable samunet checkpoint (corrupt or foreign file: "
                           f"{type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SamunetError(f"{path}: not a samunet checkpoint (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r}, expected {FORMAT})")
    return state


def check_compatible(state: dict, path, expected: dict) -> None:
    """Raise a clear error if the checkpoint belongs to another data set, configuration, head or encoder."""
    problems = []
    for key, want in expected.items():
        have = state.get(key)
        if have != want:
            problems.append(f"{key} is {have!r}, expected {want!r}")
    if problems:
        raise SamunetError(f"{path}: checkpoint does not belong to this run: " + "; ".join(problems))
