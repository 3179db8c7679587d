"""``SamunetPredictor``: prediction from Python, for notebooks, viewer plug-ins and services.

Shaped like nnU-Net v2's ``nnUNetPredictor``::

    predictor = SamunetPredictor(device="cpu")
    predictor.initialize_from_trained_model_folder("samunet_results/Dataset004_Hippocampus/"
                                                   "samunetTrainer_autosam__samunetPlans__2d", use_folds=(0,))
    predictor.predict_from_files("imagesTs", "predictions")               # a folder, as samunet_predict does
    seg = predictor.predict_single_npy_array(image, {"spacing": [z, y, x]})  # in memory, no disk access

``image`` is ``(C, Z, Y, X)`` (a 2D image: ``(C, 1, Y, X)``) in numpy axis order, with its spacing in the same
order, as ``samunet.dataset.io.read_images`` (or nnU-Net's ``SimpleITKIO``) returns them. The label map comes back
as ``(Z, Y, X)`` in the input's geometry; probabilities, on request, as ``(K, Z, Y, X)`` float32. ``samunet_predict``
is a thin layer over this class, so both give the same labels voxel for voxel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from samunet.inference.predict import EnsemblePredictor, predict_cases
from samunet.inference.predictor import probabilities_to_segmentation
from samunet.preprocessing.preprocessor import preprocess_array
from samunet.utils import SamunetError


class SamunetPredictor:
    def __init__(self, tile_step_size: float | None = None, use_mirroring: bool = True, device: str = "auto",
                 allow_tqdm: bool = True):
        """``tile_step_size``: overlap of sliding-window tiles as a fraction of the tile (default: the plans', 0.5
        as in nnU-Net); ``use_mirroring``: mirroring test-time augmentation, for models trained with mirroring."""
        self.tile_step_size = tile_step_size
        self.use_mirroring = use_mirroring
        self.device = device
        self.allow_tqdm = allow_tqdm
        self.ensemble: EnsemblePredictor | None = None

    def initialize_from_trained_model_folder(self, model_training_output_dir, use_folds=None,
                                             checkpoint_name: str = "checkpoint_final.pth") -> "SamunetPredictor":
        """Load the folds ``use_folds`` (default: every trained fold) of a ``TRAINER__PLANS__CONFIGURATION``
        folder, checking each checkpoint against the folder's plans and the encoder."""
        self.ensemble = EnsemblePredictor(model_training_output_dir, use_folds, checkpoint_name, self.device,
                                          self.use_mirroring, self.tile_step_size)
        return self

    def _ready(self) -> EnsemblePredictor:
        if self.ensemble is None:
            raise SamunetError("SamunetPredictor: call initialize_from_trained_model_folder first")
        return self.ensemble

    def predict_from_files(self, source_folder, output_folder, save_probabilities: bool = False,
                           overwrite: bool = True, num_processes_preprocessing: int = 1,
                           num_processes_segmentation_export: int = 1, num_parts: int = 1, part_id: int = 0) -> dict:
        """Predict every ``CASE_XXXX<ending>`` case of ``source_folder`` into ``output_folder`` (original geometry;
        ``overwrite=False`` skips cases already predicted); with ``num_parts`` only part ``part_id`` of the cases.
        Returns ``{"predicted": [...], "skipped": [...]}``."""
        return predict_cases(self._ready(), source_folder, output_folder, save_probabilities, not overwrite,
                             num_processes_preprocessing, num_processes_segmentation_export, self.allow_tqdm,
                             num_parts, part_id)

    def predict_single_npy_array(self, input_image: np.ndarray, image_properties: dict,
                                 segmentation_previous_stage=None, output_file_truncated: str | None = None,
                                 save_or_return_probabilities: bool = False):
        """One in-memory image ``(C, Z, Y, X)`` with ``image_properties["spacing"]`` (``[z, y, x]``; ``origin`` and
        ``direction`` optional, used only when writing) -> label map ``(Z, Y, X)``, and with
        ``save_or_return_probabilities`` also the class probabilities ``(K, Z, Y, X)``. Nothing is read from or
        written to disk unless ``output_file_truncated`` names a file (without ending) to write as well."""
        if segmentation_previous_stage is not None:
            raise SamunetError("samunet has no cascade: segmentation_previous_stage must be None")
        ens = self._ready()
        props = array_properties(input_image, image_properties, ens.dims)
        data, _, pp_props = preprocess_array(np.asarray(input_image, np.float32), props, ens.config,
                                             ens.label_values, ens.dims, ens.memory_gb)
        probs_pp = ens.predict_preprocessed_case(data)
        if output_file_truncated is not None:
            ens.export(probs_pp, pp_props, Path(f"{output_file_truncated}{ens.plans['file_ending']}"),
                       save_or_return_probabilities)
        seg, probs = probabilities_to_segmentation(probs_pp, pp_props, ens.label_values)
        seg = seg.astype(np.uint8 if seg.max(initial=0) < 256 else np.uint16)  # what a written file holds
        return (seg, probs) if save_or_return_probabilities else seg


def array_properties(image, properties: dict, dims: int | None) -> dict:
    """The properties ``read_images`` would give a file holding ``image`` ``(C, Z, Y, X)``."""
    if not isinstance(image, np.ndarray) or image.ndim != 4:
        shape = getattr(image, "shape", None)
        raise SamunetError(f"input image: expected a numpy array (C, Z, Y, X) (2D: (C, 1, Y, X)), got "
                           f"{type(image).__name__} of shape {shape}")
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise SamunetError(f"input image: numeric array expected, got dtype {image.dtype}")
    spacing = properties.get("spacing") if isinstance(properties, dict) else None
    if spacing is None or len(spacing) != 3 or not all(np.isfinite(float(s)) and float(s) > 0 for s in spacing):
        raise SamunetError(f"image properties: 'spacing' must be three positive numbers [z, y, x] (2D: [999, y, x]),"
                           f" got {spacing!r}")
    file_dims = int(properties.get("dims") or (2 if image.shape[1] == 1 and (dims == 2 or dims is None) else 3))
    direction = properties.get("direction") or np.eye(file_dims).ravel().tolist()
    return {"io": properties.get("io", "sitk"), "dims": file_dims, "spacing": [float(s) for s in spacing],
            "origin": [float(o) for o in properties.get("origin") or [0.0] * file_dims],
            "direction": [float(d) for d in direction], "shape": list(image.shape[1:]), "dtype": str(image.dtype),
            "files": [str(properties.get("name", "input image"))], "channels_per_file": [int(image.shape[0])]}

