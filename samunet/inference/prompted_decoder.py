"""Load a prompted decoder fine-tuned by ``samunet_finetune_prompted``.

    segmenter, state = load_decoder("samunet_results/Dataset004_Hippocampus/samunetPromptedTrainer__samunetPlans__2d",
                                    encoder, fold=0)

The argument is a checkpoint file, a fold folder, or a model folder (with ``fold``, or holding a single fold). The
checkpoint is read with ``weights_only`` (tensors and plain values only) and must have been fine-tuned for exactly
this encoder: same model, input size and weights (their SHA-256), else it is refused.
"""
from __future__ import annotations

from pathlib import Path

from samunet.models.encoders import encoder_identity
from samunet.models.prompted import PromptedSegmenter, trainable_copy
from samunet.models.run_checkpoint import load_checkpoint
from samunet.utils import SamunetError

CHECKPOINT = "checkpoint_final.pth"


def decoder_checkpoint(path, fold=None) -> Path:
    """The checkpoint file that ``path`` (file, fold folder or model folder) names."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / CHECKPOINT).is_file():
        return path / CHECKPOINT
    if fold is not None:
        if (path / f"fold_{fold}" / CHECKPOINT).is_file():
            return path / f"fold_{fold}" / CHECKPOINT
        raise SamunetError(f"{path / f'fold_{fold}' / CHECKPOINT}: no fine-tuned decoder (has the fold finished "
                           "training with samunet_finetune_prompted?)")
    found = sorted(path.glob(f"fold_*/{CHECKPOINT}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise SamunetError(f"{path}: no {CHECKPOINT} of a fine-tuned decoder here or in a fold_K folder")
    raise SamunetError(f"{path}: holds {len(found)} trained folds; name one (its fold_K folder or its checkpoint)")


def _describe(identity: dict) -> str:
    return (f"{identity.get('encoder')} at {identity.get('input_size')} px (weights "
            f"{str(identity.get('weights_sha256'))[:12]})")


def load_decoder(path, encoder, fold=None) -> tuple[PromptedSegmenter, dict]:
    """The fine-tuned decoder at ``path`` on ``encoder`` and its checkpoint (without the weights)."""
    file = decoder_checkpoint(path, fold)
    state = load_checkpoint(file)
    if state.get("head") != "prompted" or "decoder_state" not in state:
        raise SamunetError(f"{file}: not a fine-tuned prompted decoder (a checkpoint of head "
                           f"'{state.get('head')}'); use the fold folder of samunet_finetune_prompted")
    have, want = state.get("encoder_identity") or {}, encoder_identity(encoder)
    if have != want:
        raise SamunetError(f"{file}: this decoder was fine-tuned for the encoder {_describe(have)}, not for the "
                           f"encoder in use, {_describe(want)}; its prompts and embeddings would not match. Use "
                           "that encoder and input size, or fine-tune a decoder for this one")
    prompt_encoder, mask_decoder = trainable_copy(encoder)
    prompt_encoder.load_state_dict(state["decoder_state"]["prompt_encoder"])
    mask_decoder.load_state_dict(state["decoder_state"]["mask_decoder"])
    for module in (prompt_encoder, mask_decoder):
        module.requires_grad_(False).eval()
    segmenter = PromptedSegmenter(encoder, prompt_encoder, mask_decoder).to(encoder.device).eval()
    info = {k: v for k, v in state.items() if k not in ("decoder_state", "optimizer_state", "scaler_state")}
    return segmenter, {**info, "checkpoint": str(file)}
