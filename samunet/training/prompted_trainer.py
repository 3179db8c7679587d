"""``samunet_finetune_prompted DATASET CONFIG FOLD``: fine-tune the encoder's own prompt encoder and mask decoder.

The image encoder stays frozen and its cached embeddings are reused; the prompt encoder and the mask decoder (about
4 M parameters for LiteMedSAM) train on prompts simulated from the fold's training cases (``prompted_data``): boxes,
jittered boxes, points, box plus point, interactive sessions that feed the previous low-resolution logits and a
corrective click back, and corrections of degraded masks. The loss is binary cross-entropy + soft Dice on the mask
and the squared error of the predicted IoU against the IoU the mask actually reaches, so the IoU head (untrained in
LiteMedSAM) learns to rate masks. The epoch loop, ``--c``, early stopping and checkpoints are the head trainer's
(``samunet.training.loop``). Results: ``samunet_results/DatasetXXX/samunetPromptedTrainer[_nN]__<plans>__<config>/
fold_K/``; the checkpoint holds the two modules' weights and the encoder's identity, never the encoder.
"""
from __future__ import annotations

import shutil

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from samunet.models.for_plans import build_encoder_for_plans, resolve_device
from samunet.models.prompted import PromptedSegmenter, trainable_copy
from samunet.paths import preprocessed_folder, resolve_dataset_name
from samunet.planning.plans import get_configuration, load_plans
from samunet.preprocessing.embedding_cache import EmbeddingCache
from samunet.preprocessing.prompt_geometry import probabilities_to_logits
from samunet.preprocessing import prompt_simulation as P
from samunet.training.data import BackgroundBatches, CachedData
from samunet.training.loop import EpochLoop
from samunet.training.progress import TextLog, new_log
from samunet.training.prompted_data import KINDS, PromptedData, pad_points
from samunet.training.splits import get_split, labeled_subset
from samunet.paths import model_folder
from samunet.training.trainer import DEFAULT_PATIENCE
from samunet.utils import SamunetError, load_json, save_json

HEAD = "prompted"
DEFAULTS = {"epochs": 40, "iterations_per_epoch": 50, "batch_size": 16, "lr": 1e-4}
VAL_SAMPLES = 64
VAL_KINDS = ("box", "point")


def prompted_trainer_name(num_labeled_cases: int | None = None) -> str:
    return "samunetPromptedTrainer" + (f"_n{num_labeled_cases}" if num_labeled_cases else "")


class PromptedTrainer(EpochLoop):
    def __init__(self, dataset, configuration: str, fold, epochs: int | None = None,
                 iterations_per_epoch: int | None = None, num_labeled_cases: int | None = None,
                 device: str = "auto", seed: int = 12345, batch_size: int | None = None, patience: int | None = None,
                 lr: float | None = None, ram_budget_mb: float = 4000.0):
        self.dataset_name = resolve_dataset_name(dataset)
        self.pp_folder = preprocessed_folder() / self.dataset_name
        self.plans = load_plans(self.dataset_name)
        self.configuration = configuration
        self.config = get_configuration(self.plans, configuration)
        if self.config["inplane_mode"] != "resize" or self.config["channel_rule"]["type"] == "encode_each_and_fuse" \
                or int(self.config.get("embedding_context", 1)) != 1:
            raise SamunetError(f"configuration '{configuration}' of {self.dataset_name} does not give one encoder "
                               "input per whole slice (it tiles, encodes channels apart or fuses neighbouring "
                               "embeddings); the prompted decoder needs whole slices, as in the 2d configuration")
        self.fold = "all" if str(fold) == "all" else int(fold)
        self.num_epochs = int(epochs or DEFAULTS["epochs"])
        self.iterations = int(iterations_per_epoch or DEFAULTS["iterations_per_epoch"])
        self.batch_size = int(batch_size or DEFAULTS["batch_size"])
        self.initial_lr = float(lr or DEFAULTS["lr"])
        self.num_labeled_cases = num_labeled_cases
        self.patience = int(patience if patience is not None else
                            self.config.get("early_stopping_patience", DEFAULT_PATIENCE))
        self.device = resolve_device(device)
        self.seed = seed
        self.ram_budget_mb = ram_budget_mb
        self.label_values = self.plans["label_values"]
        self.num_classes = len(self.label_values)
        self.trainer = prompted_trainer_name(num_labeled_cases)
        self.model_dir = model_folder(self.dataset_name, self.trainer, self.plans["plans_name"], configuration)
        self.output = self.model_dir / f"fold_{self.fold}"
        self.log = new_log()
        self.epoch = 0
        self.best_ema = -1.0
        self.encoder = None

    # ----------------------------------------------------------------- set-up
    def _expected(self) -> dict:
        from samunet.models.encoders import encoder_identity
        return {"dataset_name": self.dataset_name, "configuration": self.configuration, "head": HEAD,
                "fold": str(self.fold), "encoder_identity": encoder_identity(self.encoder),
                "preprocessing_identity": self.config["preprocessing_identity"]}

    def initialize(self):
        ids = load_json(self.pp_folder / "dataset_fingerprint.json")["case_identifiers"]
        train, self.val_ids = get_split(self.pp_folder, ids, self.fold)
        self.train_ids = labeled_subset(train, self.num_labeled_cases, self.fold, self.seed)
        torch.manual_seed(self.seed)
        self.encoder = build_encoder_for_plans(self.plans, self.config, self.device)
        from samunet.models.encoders import encoder_identity
        self.cache = EmbeddingCache(self.pp_folder, self.configuration, self.config, encoder_identity(self.encoder),
                                    self.label_values)
        needed = sorted(set(self.train_ids) | set(self.val_ids))
        if self.cache.missing(needed):  # a complete cache is only read
            self.cache.build(needed, self.encoder, self.ram_budget_mb)
        self.train_data = PromptedData(CachedData(self.cache, self.train_ids, self.num_classes), self.num_classes)
        self.val_data = PromptedData(CachedData(self.cache, self.val_ids, self.num_classes), self.num_classes)
        self.val_rows = self.val_data.sampler.draw(np.random.default_rng([self.seed, 10**6]), VAL_SAMPLES)
        prompt_encoder, mask_decoder = trainable_copy(self.encoder)
        self.segmenter = PromptedSegmenter(self.encoder, prompt_encoder, mask_decoder).to(self.device)
        self.params = list(prompt_encoder.parameters()) + list(mask_decoder.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=self.initial_lr, weight_decay=0.01)
        self.setup_precision()
        self.text = TextLog(self.output)

    # ----------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        return {**self._expected(), "trainer": self.trainer, "label_values": self.label_values,
                "decoder_state": {"prompt_encoder": self.segmenter.prompt_encoder.state_dict(),
                                  "mask_decoder": self.segmenter.mask_decoder.state_dict()},
                "optimizer_state": self.optimizer.state_dict(), "scaler_state": self.scaler.state_dict(),
                "epoch": self.epoch, "num_epochs": self.num_epochs, "iterations_per_epoch": self.iterations,
                "batch_size": self.batch_size, "seed": self.seed, "log": self.log, "best_ema": self.best_ema,
                "train_cases": self.train_ids, "val_cases": self.val_ids, "prompt_kinds": dict(KINDS)}

    def _load_state(self, state: dict) -> None:
        self.segmenter.prompt_encoder.load_state_dict(state["decoder_state"]["prompt_encoder"])
        self.segmenter.mask_decoder.load_state_dict(state["decoder_state"]["mask_decoder"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scaler.load_state_dict(state["scaler_state"])

    def _write_run_files(self) -> None:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        save_json(self.plans, self.model_dir / "plans.json")
        if (self.pp_folder / "dataset.json").is_file():
            shutil.copyfile(self.pp_folder / "dataset.json", self.model_dir / "dataset.json")
        save_json({"trainer": self.trainer, "head": HEAD, "configuration": self.configuration,
                   "fold": str(self.fold), "num_epochs": self.num_epochs, "iterations_per_epoch": self.iterations,
                   "batch_size": self.batch_size, "num_labeled_cases": self.num_labeled_cases,
                   "train_cases": self.train_ids, "val_cases": self.val_ids, "device": str(self.device),
                   "seed": self.seed, "initial_lr": self.initial_lr, "early_stopping_patience": self.patience,
                   "prompt_kinds": KINDS}, self.output / "debug.json")

    def _describe(self) -> str:
        return (f"{self.dataset_name} {self.configuration} fold {self.fold}: prompted decoder, "
                f"{len(self.train_ids)} training / {len(self.val_ids)} validation cases, {len(self.train_data)} "
                f"training slices with objects (cached embeddings), at most {self.num_epochs} epochs x "
                f"{self.iterations} iterations x batch {self.batch_size}")

    # ----------------------------------------------------------------- decoding and loss
    def _mask_logits(self, prob: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(prob, np.float32))[None, None]
        size = self.segmenter.low_res_size
        if t.shape[-1] != size:
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        return probabilities_to_logits(t)[0].to(self.device)

    def _decode(self, emb: torch.Tensor, items: list[dict]):
        """Decode each item's current prompts on its embedding: full-size logits (N, 1, P, P), IoU (N,), low-res
        logits (N, 1, L, L). Items with the same kinds of prompt are decoded together."""
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it["box"] is not None, it.get("mask_in") is not None), []).append(i)
        full, iou, low = [None] * len(items), [None] * len(items), [None] * len(items)
        for (has_box, has_mask), idx in groups.items():
            sub = [items[i] for i in idx]
            pts, labs = pad_points(sub)
            out = self.segmenter.decode_each(
                emb[idx], None if pts is None else pts.to(self.device), None if labs is None else labs.to(self.device),
                torch.tensor(np.stack([it["box"] for it in sub]), dtype=torch.float32, device=self.device)
                if has_box else None,
                torch.stack([it["mask_in"] for it in sub]) if has_mask else None)
            for k, i in enumerate(idx):
                full[i], iou[i], low[i] = out.masks[k], out.iou[k, 0], out.low_res[k]
        return torch.stack(full), torch.stack(iou), torch.stack(low)

    @torch.no_grad()
    def _play_rounds(self, emb: torch.Tensor, items: list[dict]) -> None:
        """Play the corrective rounds of ``session`` and ``refine`` items up to their last (graded) round: each
        round adds a click deepest inside the largest error region and feeds the previous logits back."""
        for it in items:
            it["mask_in"] = None if it["mask_prob"] is None else self._mask_logits(it["mask_prob"])
            it["pred"] = None if it["mask_prob"] is None else it["mask_prob"] > 0.5
        first = [i for i, it in enumerate(items) if it["rounds"] and it["pred"] is None]
        if first:   # sessions start from their first point
            full, _, low = self._decode(emb[first], [items[i] for i in first])
            for k, i in enumerate(first):
                items[i]["pred"] = (full[k, 0] > 0).cpu().numpy()
                items[i]["mask_in"] = low[k]
        for r in range(1, max((it["rounds"] for it in items), default=0) + 1):
            active = []
            for i, it in enumerate(items):
                if it["rounds"] < r:
                    continue
                click = P.correction_click(it["pred"] & it["valid"], it["target"])
                if click is None:           # nothing left to correct: grade the current prompts
                    it["rounds"] = r - 1
                    continue
                it["points"] = np.concatenate([np.zeros((0, 2)) if it["points"] is None else it["points"],
                                               np.array([click[0]], np.float64)])
                it["labels"] = np.r_[np.zeros(0) if it["labels"] is None else it["labels"], click[1]]
                if it["rounds"] > r:
                    active.append(i)
            if active:
                full, _, low = self._decode(emb[active], [items[i] for i in active])
                for k, i in enumerate(active):
                    items[i]["pred"] = (full[k, 0] > 0).cpu().numpy()
                    items[i]["mask_in"] = low[k]

    def _loss(self, emb: torch.Tensor, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask BCE + soft Dice + predicted-IoU squared error, and the hard predicted masks (N, P, P)."""
        with self._autocast():
            full, iou_pred, _ = self._decode(emb, items)
        logits = full[:, 0].float()
        target = torch.from_numpy(np.stack([it["target"] for it in items])).to(self.device).float()
        valid = torch.from_numpy(np.stack([it["valid"] for it in items])).to(self.device).float()
        n_valid = valid.sum((1, 2)).clamp_min(1)
        bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum((1, 2)) / n_valid
        prob = torch.sigmoid(logits) * valid
        dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
        with torch.no_grad():
            hard = (logits > 0).float() * valid
            inter, union = (hard * target).sum((1, 2)), ((hard + target) > 0).float().sum((1, 2))
            iou_true = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
            given = [i for i, it in enumerate(items) if it["iou_target"] is not None]
            iou_true[given] = torch.tensor([items[i]["iou_target"] for i in given], device=self.device)
        loss = bce.mean() + dice.mean() + F.mse_loss(iou_pred.float(), iou_true)
        return loss, hard.bool()

    # ----------------------------------------------------------------- epochs
    def train_epoch(self) -> float:
        self.segmenter.train()
        self.set_poly_lr()
        torch.manual_seed(self.seed * 1000 + self.epoch)
        losses = []
        batches = BackgroundBatches(self.train_data, self.iterations, self.batch_size, self.seed, self.epoch)
        for batch in tqdm(batches, total=self.iterations, desc=f"epoch {self.epoch}", leave=False):
            emb = batch["emb"].to(self.device, non_blocking=True)
            self._play_rounds(emb, batch["items"])
            loss, _ = self._loss(emb, batch["items"])
            self.step(loss)
            losses.append(loss.item())
        return float(np.mean(losses))

    @torch.no_grad()
    def validate_epoch(self) -> tuple[float, list[float]]:
        """Mean Dice of the tight box and of the centre point on a fixed set of validation objects."""
        self.segmenter.eval()
        losses, dice = [], []
        for kind in VAL_KINDS:
            scores = []
            for a in range(0, len(self.val_rows), self.batch_size):
                rows = self.val_rows[a:a + self.batch_size]
                batch = self.val_data.batch(rows, np.random.default_rng([self.seed, int(rows[0])]), kind=kind)
                if kind == "point":   # the centre point, as the zero-shot suite gives it
                    for it in batch["items"]:
                        it["points"] = np.array([P.centre_point(it["target"])], np.float64)
                for it in batch["items"]:
                    it["mask_in"] = None
                loss, hard = self._loss(batch["emb"].to(self.device), batch["items"])
                losses.append(loss.item())
                scores += [P.dice(h, it["target"]) for h, it in zip(hard.cpu().numpy(), batch["items"])]
            dice.append(float(np.nanmean(scores)))
        return float(np.mean(losses)), dice


def run_prompted_training(dataset, configuration: str, fold, epochs=None, iterations_per_epoch=None,
                          num_labeled_cases=None, continue_training=False, device="auto", batch_size=None,
                          patience=None, lr=None) -> PromptedTrainer:
    """Fine-tune the prompted decoder on one fold; ``checkpoint_final.pth`` is what ``--decoder`` loads."""
    t = PromptedTrainer(dataset, configuration, fold, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                        num_labeled_cases=num_labeled_cases, device=device, batch_size=batch_size,
                        patience=patience, lr=lr)
    t.run(continue_training)
    return t

