"""``samunet_pretrain DATASET CONFIG FOLD``: self-supervised pre-training of the from-scratch U-Net, labels unused.

    samunet_pretrain 4 2d 0                                   # masked image modelling on the fold's training slices
    samunet_train 4 2d 0 --head unet --pretrained_weights \\
        $samunet_results/Dataset004_Hippocampus/samunetPretrainer_mim__samunetPlans__2d/fold_0/checkpoint_final.pth

This is the honest competitor of the frozen SAM encoder in the label-efficiency study: in-domain self-supervision
on the same data set's unlabelled images, then fine-tuning on the few labelled ones. If it does as well as the
SAM heads, the foundation model's pre-training adds nothing.

Method: **masked image modelling** with the U-Net itself (the restoration family of Models Genesis, Zhou et al.,
MICCAI 2019 / MedIA 2021, in the masked-patch form that Wald et al., "Revisiting MAE pre-training for 3D medical
image segmentation", CVPR 2025, found the strongest self-supervised pre-training for CNN U-Nets on medical data).
Square patches of each augmented U-Net input (the slice on its canvas; ``MASK_GRID`` x ``MASK_GRID`` patches,
``MASK_RATIO`` of them) are set to zero, and the U-Net, with one output channel per input channel, reconstructs the
image; the loss is the mean squared error on the masked pixels only. It was chosen over global + local contrastive
learning (Chaitanya et al., NeurIPS 2020) because it pre-trains the encoder *and* the decoder that segmentation
reuses, needs no negatives (contrastive learning wants large batches, which a CPU cannot afford), and no hand-made
partition of the volumes into corresponding regions.

Every training slice of the fold is used, with the same spatial and intensity augmentation as the U-Net's own
training; labels are not read by the loss nor by the sampler (uniform over slices). The fold's validation images
(again without labels) only report the reconstruction score (R^2 on masked pixels) each epoch. Fine-tuning
(``load_pretrained_unet``) copies every pre-trained tensor except the output layer, which is freshly initialised
for the classes; a checkpoint of another data set, configuration, preprocessing or topology is refused.
"""
from __future__ import annotations

import numpy as np
import torch

from samunet.models.run_checkpoint import check_compatible, load_checkpoint
from samunet.training.data import OnTheFlyData, uniform_sampling
from samunet.training.splits import get_split
from samunet.paths import model_folder
from samunet.training.trainer import Trainer
from samunet.utils import SamunetError

PRETRAINER = "samunetPretrainer_mim"
METHOD = "masked image modelling"
MASK_GRID = 8          # the encoder input is cut into MASK_GRID x MASK_GRID square patches ...
MASK_RATIO = 0.6       # ... of which this fraction is masked (set to zero) in every sample
OUTPUT_LAYER = "seg_layers"  # dynamic-network-architectures' name of the U-Net's output convolution
VAL_ROWS = 48


def random_patch_mask(n: int, size: int, grid: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, size, size) float mask, 1 on the ``round(ratio * grid**2)`` masked patches of each sample."""
    patch = -(-size // grid)
    k = int(round(ratio * grid * grid))
    order = torch.rand(n, grid * grid, generator=generator).argsort(1)[:, :k]
    m = torch.zeros(n, grid * grid).scatter_(1, order, 1.0).view(n, 1, grid, grid)
    return m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :size, :size]


def masked_reconstruction_error(model, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reconstruct ``images`` (B, C, P, P) from their unmasked part; returns (mean squared error on the masked
    pixels, the masked targets' values and the squared errors there, flattened)."""
    out = model(images * (1 - mask))
    sel = mask.expand_as(images).bool()
    err = (out - images)[sel] ** 2
    return err.mean(), images[sel], err


class Pretrainer(Trainer):
    """The U-Net's training loop with a reconstruction loss in place of the segmentation loss."""

    score_name = "masked-pixel R^2"

    def __init__(self, dataset, configuration: str, fold, epochs: int | None = None,
                 iterations_per_epoch: int | None = None, batch_size: int | None = None, device: str = "auto",
                 seed: int = 12345):
        super().__init__(dataset, configuration, fold, head="unet", epochs=epochs,
                         iterations_per_epoch=iterations_per_epoch, device=device, seed=seed,
                         batch_size=batch_size, patience=0)
        self.trainer = PRETRAINER
        self.model_dir = model_folder(self.dataset_name, PRETRAINER, self.plans["plans_name"], configuration)
        self.output = self.model_dir / f"fold_{self.fold}"

    def _expected(self) -> dict:
        return {**super()._expected(), "pretraining": METHOD}

    def initialize(self):
        from samunet.training.progress import TextLog
        self.text = TextLog(self.output) if self.dist.is_main else (lambda message: None)
        ids = self._case_ids()
        self.train_ids, self.val_ids = get_split(self.pp_folder, ids, self.fold)
        torch.manual_seed(self.seed)
        n_ch = len(self.plans["channel_names"])
        self.n_enc = n_ch if self.config["channel_rule"]["type"] == "encode_each_and_fuse" else 1
        self.context = 1
        self.num_outputs = 3 * self.n_enc  # one output per input channel: the reconstructed image
        self._build_unet(self.num_outputs)
        self.head.set_deep_supervision(False)  # the reconstruction is learnt at full resolution only
        self.params = list(self.head.parameters())
        self.setup_precision()
        data_dir = self.pp_folder / self.config["data_identifier"]
        self.train_data = uniform_sampling(OnTheFlyData(data_dir, self.train_ids, self.image_config, self.label_values,
                                                        augment=True))
        self.val_data = OnTheFlyData(data_dir, self.val_ids, self.image_config, self.label_values, augment=False)
        rng = np.random.default_rng([self.seed, 10**6])
        self.val_rows = np.sort(rng.permutation(len(self.val_data))[:VAL_ROWS])
        self._wrap_for_training()  # under torchrun: DistributedDataParallel (every process validates all rows)

    def _loss(self, batch: dict) -> torch.Tensor:
        images = self._embed(batch)  # (B, C, Q, Q) canvas images
        mask = random_patch_mask(len(images), images.shape[-1], MASK_GRID, MASK_RATIO, None).to(self.device)
        with self._autocast():
            return masked_reconstruction_error(self.train_head, images, mask)[0]

    @torch.no_grad()
    def validate_epoch(self) -> tuple[float, list[float]]:
        """Mean squared error and R^2 on the masked pixels of fixed masks over fixed validation slices."""
        self.head.eval()
        gen = torch.Generator().manual_seed(self.seed)
        losses, values, errors = [], [], []
        for i in range(0, len(self.val_rows), self.batch_size):
            images = self._embed(self.val_data.batch(self.val_rows[i:i + self.batch_size]))
            mask = random_patch_mask(len(images), images.shape[-1], MASK_GRID, MASK_RATIO, gen).to(self.device)
            with self._autocast():
                loss, v, e = masked_reconstruction_error(self.head, images, mask)
            losses.append(loss.item())
            values.append(v.float().cpu())
            errors.append(e.float().cpu())
        v, e = torch.cat(values), torch.cat(errors)
        r2 = 1.0 - float(e.sum() / ((v - v.mean()) ** 2).sum().clamp_min(1e-12))
        return float(np.mean(losses)), [r2]

    def _state(self) -> dict:
        return {**super()._state(), "pretraining": METHOD, "num_outputs": self.num_outputs,
                "mask_grid": MASK_GRID, "mask_ratio": MASK_RATIO}

    def _describe(self) -> str:
        return (f"{self.dataset_name} {self.configuration} fold {self.fold}: self-supervised pre-training of the "
                f"U-Net, {len(self.train_ids)} training cases ({len(self.train_data)} slices; "
                f"{self._input_kind()}), reconstruction scored on {len(self.val_ids)} validation cases' slices, "
                f"{self.num_epochs} epochs x {self.iterations} iterations x batch {self.batch_size}")

    def _input_kind(self) -> str:
        return f"augmented images, labels unused; {METHOD}, {MASK_RATIO:.0%} of {MASK_GRID}x{MASK_GRID} patches masked"


def load_pretrained_unet(model: torch.nn.Module, path, expected: dict, architecture: dict) -> str:
    """Copy a ``samunet_pretrain`` checkpoint's weights into ``model`` (a U-Net for ``expected``'s data set and
    configuration), all but the output layer; returns a line for the training log."""
    state = load_checkpoint(path)
    if "pretraining" not in state:
        raise SamunetError(f"{path}: not a samunet_pretrain checkpoint (it holds a trained "
                           f"'{state.get('head')}' model of trainer {state.get('trainer')}); pass the "
                           f"checkpoint_final.pth of {PRETRAINER}")
    check_compatible(state, path, {k: expected[k] for k in ("dataset_name", "configuration",
                                                            "preprocessing_identity")})
    have = state.get("unet_architecture")
    want = {k: v for k, v in architecture.items() if not k.endswith("reason")}
    if have != want:
        diff = sorted(k for k in set(have or {}) | set(want) if (have or {}).get(k) != want.get(k))
        raise SamunetError(f"{path}: pre-trained U-Net has another topology ({', '.join(diff)} differ); "
                           "pre-train with the plans used for this training")
    own = model.state_dict()
    copied = {k: v for k, v in state["head_state"].items() if OUTPUT_LAYER not in k}
    bad = [k for k, v in copied.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if OUTPUT_LAYER not in k and k not in copied]
    if bad or missing:
        raise SamunetError(f"{path}: pre-trained weights do not fit this U-Net ({len(bad)} foreign or mis-shaped, "
                           f"{len(missing)} missing tensors, e.g. {(bad + missing)[0]})")
    model.load_state_dict({**own, **copied})
    return (f"U-Net initialised from {path} ({state['pretraining']}, {state['epoch']} epochs x "
            f"{state['iterations_per_epoch']} iterations x batch {state['batch_size']}): {len(copied)} tensors "
            f"copied, the output layer ({OUTPUT_LAYER}) freshly initialised")


def run_pretraining(dataset, configuration: str, fold, epochs=None, iterations_per_epoch=None, batch_size=None,
                    device="auto", continue_training=False) -> Pretrainer:
    t = Pretrainer(dataset, configuration, fold, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                   batch_size=batch_size, device=device)
    t.run(continue_training)
    return t
