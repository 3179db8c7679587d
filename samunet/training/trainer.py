"""``samunet_train DATASET CONFIG FOLD``: train a prompt-free head on a frozen encoder for one fold.

Results go to ``samunet_results/DatasetXXX/<trainer>__<plans>__<config>/fold_K`` where the trainer name carries
the head and, for label-efficiency runs, the number of labelled cases (``samunetTrainer_autosam_n5``), so runs
never overwrite each other.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from samunet.models.for_plans import build_encoder_for_plans, build_model
from samunet.paths import model_folder, preprocessed_folder, resolve_dataset_name, trainer_name
from samunet.planning.plans import get_configuration, load_plans
from samunet.preprocessing.embedding_cache import EmbeddingCache
from samunet.training.augmented_views import AugmentedViews, default_views
from samunet.training.cached_augmentation import WarpParams
from samunet.training.data import BackgroundBatches, CachedData, OnTheFlyData
from samunet.training.distributed import init_distributed, shard
from samunet.training.scale_out import ScaleOut
from samunet.models.specs import HEADS, HYBRID_HEADS, IMAGE_MODELS, get_encoder_spec, uncached_head
from samunet.training.loop import EpochLoop
from samunet.training.losses import confusion_counts, dice_ce_loss, segmentation_loss
from samunet.training.progress import TextLog, new_log
from samunet.training.self_training import check_student_options
from samunet.training.splits import get_split, labeled_subset
from samunet.utils import SamunetError, load_json, save_json

logger = logging.getLogger("samunet")

DEFAULT_PATIENCE = 20  # for plans written before the planner recorded early_stopping_patience
VAL_ROWS_CACHED = 512
VAL_ROWS_ON_THE_FLY = 48


class Trainer(EpochLoop, ScaleOut):
    def __init__(self, dataset, configuration: str, fold, head: str | None = None, epochs: int | None = None,
                 iterations_per_epoch: int | None = None, num_labeled_cases: int | None = None,
                 device: str = "auto", use_cache: bool | None = None, seed: int = 12345,
                 ram_budget_mb: float = 4000.0, batch_size: int | None = None, patience: int | None = None,
                 augmented_views: int | None = None, pretrained_weights: str | Path | None = None,
                 plans_name: str = "samunetPlans", compile_model: bool = False, cooldown: int | None = None,
                 self_training: bool = False, unlabeled_folder: str | Path | None = None,
                 pseudo_label_tta: bool = False):
        self.dataset_name = resolve_dataset_name(dataset)
        self.pp_folder = preprocessed_folder() / self.dataset_name
        self.plans = load_plans(self.dataset_name, plans_name)
        self.configuration = configuration
        self.config = get_configuration(self.plans, configuration)
        self.fold = "all" if str(fold) == "all" else int(fold)
        self.head_name = head or self.config["head"]
        if self.head_name not in HEADS:
            raise SamunetError(f"unknown head '{self.head_name}' (choose {', '.join(HEADS)})")
        if head is None and use_cache is False and self.head_name in HYBRID_HEADS:
            # the plans' default reads the cache; without it, the head the planner picks for uncached embeddings
            self.head_name = uncached_head(get_encoder_spec(self.plans["encoder"]["name"]))[0]
            logger.info("--no_cache: the plans' %s head reads cached embeddings; training the %s head instead",
                        self.config["head"], self.head_name)
        self.num_epochs = int(epochs or self.config["num_epochs"])
        self.iterations = int(iterations_per_epoch or self.config["iterations_per_epoch"])
        self.num_labeled_cases = num_labeled_cases
        self.augmented_views = augmented_views  # None: the budget rule for hybrid heads, none for the others
        self.views = None
        # early stopping: epochs without a new best moving-average pseudo-Dice before training stops (0: never)
        self.patience = int(patience if patience is not None else
                            self.config.get("early_stopping_patience", DEFAULT_PATIENCE))
        self.cooldown_epochs = int(cooldown if cooldown is not None else self.config.get("cooldown_epochs", 0))
        if self.cooldown_epochs < 0:
            raise SamunetError(f"--cooldown {self.cooldown_epochs}: must be 0 or more epochs")
        self.dist = init_distributed(device)  # under torchrun: this process's rank and device, else one process
        self.device = self.dist.device
        self.compile_model = compile_model
        cpu_cap = self.config.get("cpu_num_epochs", {}).get(self.head_name)
        if epochs is None and self.device.type == "cpu" and cpu_cap is not None:
            self.num_epochs = int(cpu_cap)  # the planner's CPU cap (cpu_num_epochs_reason in the plans)
        self.use_cache = self.config["cache_embeddings"] if use_cache is None else use_cache
        self.takes_images = self.head_name in IMAGE_MODELS
        self.hybrid = self.head_name in HYBRID_HEADS
        if self.hybrid and not self.use_cache:
            raise SamunetError(f"--head {self.head_name} reads the cached embeddings; this configuration (or "
                               "--no_cache) does not cache them")
        if self.takes_images:
            if use_cache:
                raise SamunetError(f"--head {self.head_name} is trained on images, not on cached embeddings")
            self.use_cache = False
        self.seed = seed
        self.ram_budget_mb = ram_budget_mb
        self.label_values = self.plans["label_values"]
        self.num_classes = len(self.label_values)
        self.batch_size = int(batch_size or self.config["batch_size"])  # the global batch, over all processes
        self.device_plan = None
        if self.device.type == "cuda":
            self._plan_for_device(batch_size, use_cache)
        self.local_batch = self.dist.batch_share(self.batch_size)
        self.pretrained_weights = Path(pretrained_weights) if pretrained_weights else None
        if self.pretrained_weights is not None and self.head_name not in IMAGE_MODELS:
            raise SamunetError(f"--pretrained_weights fine-tunes the U-Net (--head {IMAGE_MODELS[0]}) from "
                               f"samunet_pretrain; the {self.head_name} head starts from the frozen encoder instead")
        self.student = bool(self_training)
        self.self_training = None  # a student's record of its teacher and data (samunet.training.self_training)
        self.unlabeled_folder = Path(unlabeled_folder) if unlabeled_folder else None
        self.pseudo_label_tta = bool(pseudo_label_tta)
        check_student_options(self)
        self.trainer = trainer_name(self.head_name, num_labeled_cases, self.pretrained_weights is not None,
                                    self_training)
        self.model_dir = model_folder(self.dataset_name, self.trainer, self.plans["plans_name"], configuration)
        self.output = self.model_dir / (f"fold_{self.fold}")
        self.log = new_log()
        self.epoch = 0
        self.best_ema = -1.0
        self.encoder = self.head = self.optimizer = self.cache = None

    # ----------------------------------------------------------------- set-up
    def _case_ids(self) -> list[str]:
        fp = load_json(self.pp_folder / "dataset_fingerprint.json")
        ids = fp["case_identifiers"]
        data_dir = self.pp_folder / self.config["data_identifier"]
        missing = [i for i in ids if not (data_dir / f"{i}.json").is_file()]
        if missing:
            raise SamunetError(f"{len(missing)} case(s) are not preprocessed in {data_dir} (e.g. {missing[0]}); "
                               f"run samunet_preprocess -d {self.dataset_name} -c {self.configuration}")
        return ids

    def _identity(self) -> dict | None:
        from samunet.models.encoders import encoder_identity
        return None if self.encoder is None else encoder_identity(self.encoder)

    def _expected(self) -> dict:
        return {"dataset_name": self.dataset_name, "configuration": self.configuration, "head": self.head_name,
                "fold": str(self.fold), "encoder_identity": self._identity(),
                "preprocessing_identity": self.config["preprocessing_identity"]}

    def initialize(self, training: bool = True):
        """Split, model, cache and data; ``training=False`` (a validation-only run) builds no augmented views,
        which only training reads."""
        self.text = TextLog(self.output) if self.dist.is_main else (lambda message: None)
        ids = self._case_ids()
        train, val = get_split(self.pp_folder, ids, self.fold)
        self.train_ids = labeled_subset(train, self.num_labeled_cases, self.fold, self.seed)
        self.val_ids = val
        torch.manual_seed(self.seed)
        n_ch = len(self.plans["channel_names"])
        self.n_enc = n_ch if self.config["channel_rule"]["type"] == "encode_each_and_fuse" else 1
        self.context = int(self.config.get("embedding_context", 1))  # 2.5d_emb: embeddings of s-1, s, s+1
        if self.context > 1 and not self.use_cache and not self.takes_images:
            raise SamunetError(f"configuration {self.configuration} fuses cached embeddings of neighbouring slices; "
                               "it needs the embedding cache (drop --no_cache)")
        if self.takes_images:
            self._build_unet()
        elif self.hybrid:
            self._build_hybrid()
        else:
            self.encoder = build_encoder_for_plans(self.plans, self.config, self.device)
            self.head = build_model(self.head_name, self.encoder, self.num_classes, self.n_enc,
                                    self.context).to(self.device)
            self.initial_lr = float(self.config["initial_lr"][self.head_name])
            self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.initial_lr, weight_decay=1e-4)
        self.params = list(self.head.parameters())
        self.setup_precision()
        if not self.takes_images:
            self.cache = EmbeddingCache(self.pp_folder, self.configuration, self.config, self._identity(),
                                        self.label_values)
        data_dir = self.pp_folder / self.config["data_identifier"]
        if self.use_cache:
            # each process encodes its share of the cases, then all read the whole cache
            self.cache.build(shard(sorted(set(self.train_ids) | set(self.val_ids)), self.dist.rank,
                                   self.dist.world_size), self.encoder, self.ram_budget_mb)
            self.dist.barrier()
            canvas = self.hybrid_architecture["canvas_size"] if self.hybrid else None
            warp = WarpParams() if self.hybrid else None
            n_views = self.augmented_views if training else 0
            if n_views is None and self.hybrid:
                inputs = sum(len(self.cache.load(i)[0]) for i in self.train_ids)
                n_views, why = default_views(self.config.get("augmented_views"), inputs,
                                             self.num_epochs * self.iterations * self.batch_size)
                self.text(f"augmented views: {n_views} per labelled input ({inputs} inputs; {why})")
            if n_views:
                self.views = AugmentedViews(self.cache, canvas, n_views, self.seed)
                self.views.build(shard(self.train_ids, self.dist.rank, self.dist.world_size), self.encoder,
                                 self.ram_budget_mb)
                self.dist.barrier()
            self.train_data = CachedData(self.cache, self.train_ids, self.num_classes, canvas, warp, self.views)
            if training and self.student:
                from samunet.training.self_training import student_data
                self.train_data, self.self_training = student_data(self, train, canvas, warp)
            self.val_data = CachedData(self.cache, self.val_ids, self.num_classes, canvas)
        else:
            cfg = self.image_config if self.takes_images else self.config
            self.train_data = OnTheFlyData(data_dir, self.train_ids, cfg, self.label_values, augment=True)
            self.val_data = OnTheFlyData(data_dir, self.val_ids, cfg, self.label_values, augment=False)
        n_val = VAL_ROWS_CACHED if self.use_cache else VAL_ROWS_ON_THE_FLY
        rng = np.random.default_rng([self.seed, 10**6])
        self.val_rows = np.sort(rng.permutation(len(self.val_data))[:n_val])
        self._wrap_for_training()

    def _build_unet(self, num_outputs: int | None = None) -> None:
        """The from-scratch U-Net: nnU-Net's topology for its canvas, nnU-Net's optimiser; with
        ``pretrained_weights``, its weights start from a ``samunet_pretrain`` checkpoint. ``image_config`` is the
        configuration with the canvas as its input size, for the data that feed the U-Net."""
        from samunet.models.unet import canvas_block
        arch = self.config.get("unet")
        if arch is None:  # plans written before the planner had a unet block: the same rule, applied here
            arch = canvas_block(self.config)
            logger.info("the plans have no 'unet' block; using the planner's rule (canvas %d px)", arch["canvas_size"])
        self.unet_architecture = {k: v for k, v in arch.items() if not k.endswith("reason")}
        canvas = self.unet_architecture.get("canvas_size")  # absent in older plans: the encoder input
        self.image_config = {**self.config, "encoder_input_size": int(canvas)} if canvas else self.config
        self.head = build_model("unet", None, num_outputs or self.num_classes, self.n_enc,
                                unet_architecture=self.unet_architecture).to(self.device)
        if self.pretrained_weights is not None:
            from samunet.training.pretrain import load_pretrained_unet
            self.text(load_pretrained_unet(self.head, self.pretrained_weights, self._expected(),
                                           self.unet_architecture))
        self._nnunet_sgd()

    def _build_hybrid(self) -> None:
        """The hybrid head: a U-Net on the slice at the data's resolution fed the frozen embedding; nnU-Net's SGD."""
        from samunet.models.hybrid import hybrid_block
        arch = self.config.get("hybrid")
        if arch is None:  # plans written before the planner had a hybrid block: the same rule, applied here
            arch = hybrid_block(self.config)
            logger.info("the plans have no 'hybrid' block; using the planner's rule (canvas %d px)",
                        arch["canvas_size"])
        self.hybrid_architecture = {k: v for k, v in arch.items() if not k.endswith("reason")}
        self.encoder = build_encoder_for_plans(self.plans, self.config, self.device)
        self.head = build_model("hybrid", self.encoder, self.num_classes, self.n_enc, self.context,
                                hybrid_architecture=self.hybrid_architecture).to(self.device)
        self._nnunet_sgd()

    def _nnunet_sgd(self) -> None:
        """nnU-Net's optimiser, for the models that are mostly a U-Net (the U-Net and the hybrid head)."""
        from samunet.planning.planner import INITIAL_LR
        self.initial_lr = float(self.config["initial_lr"].get(self.head_name, INITIAL_LR[self.head_name]))
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=self.initial_lr, momentum=0.99, nesterov=True,
                                         weight_decay=3e-5)

    # ----------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        extra = {"unet_architecture": self.unet_architecture} if self.takes_images else \
            {"hybrid_architecture": self.hybrid_architecture} if self.hybrid else {}
        return {**self._expected(), **extra, "trainer": self.trainer, "num_classes": self.num_classes,
                "label_values": self.label_values, "in_channels_multiplier": self.n_enc,
                "embedding_context": self.context,
                "head_state": self.head.state_dict(), "optimizer_state": self.optimizer.state_dict(),
                "scaler_state": self.scaler.state_dict(), "epoch": self.epoch, "num_epochs": self.num_epochs,
                "iterations_per_epoch": self.iterations, "batch_size": self.batch_size, "seed": self.seed,
                "log": self.log, "best_ema": self.best_ema, "train_cases": self.train_ids,
                "use_cache": bool(self.use_cache),
                # in-plane axes mirrored by the training augmentation (none on cached embeddings, whose mirrored
                # views are not cached): prediction
                # mirrors only along these, since a model never shown mirrored inputs may swap left/right labels
                # (augmented views are encoded with mirroring, so their embeddings are exact)
                "mirroring_axes": [0, 1] if self.views is not None or not self.use_cache else [],
                "augmented_views": self.views.views if self.views is not None else 0,
                "pretrained_weights": str(self.pretrained_weights) if self.pretrained_weights else None,
                "self_training": self.self_training}

    def _load_state(self, state: dict) -> None:
        if self.student:
            from samunet.training.self_training import check_resumed_student
            check_resumed_student(self.self_training, state.get("self_training"), self.output)
        self.head.load_state_dict(state["head_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scaler.load_state_dict(state["scaler_state"])

    # ----------------------------------------------------------------- steps
    def _inputs(self, batch: dict) -> tuple:
        """The model's arguments: embeddings for a head, images for the U-Net, both for the hybrid head."""
        if self.hybrid:
            return self._embed(batch), batch["images"].to(self.device, non_blocking=True)
        return (self._embed(batch),)

    def _embed(self, batch: dict) -> torch.Tensor:
        """Embeddings for a head, the images on its canvas themselves for the U-Net."""
        if self.takes_images:
            x = batch["images"].to(self.device, non_blocking=True)  # (B, n_enc, 3, Q, Q)
            return x.reshape(x.shape[0], -1, *x.shape[3:])
        if "emb" in batch:
            return batch["emb"].to(self.device, non_blocking=True)
        x = batch["images"].to(self.device, non_blocking=True)
        with torch.no_grad(), self._autocast():  # on a GPU the encoder runs in bfloat16 on the fly
            e = self.encoder(x.reshape(-1, *x.shape[2:])).float()
        return e.reshape(x.shape[0], self.n_enc * e.shape[1], *e.shape[2:])

    def train_epoch(self) -> float:
        self.head.train()
        self.set_poly_lr()
        torch.manual_seed(self.seed * 1000 + self.epoch + 7919 * self.dist.rank)
        losses = []
        batches = BackgroundBatches(self.train_data, self.iterations, self.local_batch, self.seed, self.epoch,
                                    rank=self.dist.rank, pin=self.device.type == "cuda")
        for batch in tqdm(batches, total=self.iterations, desc=f"epoch {self.epoch}", leave=False,
                          disable=not self.dist.is_main):
            loss = self._loss(batch)
            self.step(loss)
            losses.append(loss.item())
        total = self.dist.all_reduce_sum(torch.tensor([float(np.sum(losses)), len(losses)], dtype=torch.float64))
        return float(total[0] / total[1])

    def _loss(self, batch: dict) -> torch.Tensor:
        """The training loss of one batch (Dice + cross-entropy against the labels, at every decoder resolution
        for a model with deep supervision)."""
        emb, *rest = self._inputs(batch)
        if self.use_cache:  # feature-space regularisation, valid on cached embeddings
            emb = F.dropout2d(emb, 0.1) + 0.05 * emb.std() * torch.randn_like(emb)
        target = batch["target"].to(self.device)
        with self._autocast():
            return segmentation_loss(self.train_head(emb, *rest), target)

    @torch.no_grad()
    def validate_epoch(self) -> tuple[float, list[float]]:
        self.head.eval()
        counts = torch.zeros((self.num_classes, 3), dtype=torch.float64)
        losses = []
        rows = self.val_rows[self.dist.rank::self.dist.world_size]  # each process validates its share
        for i in range(0, len(rows), self.local_batch):
            batch = self.val_data.batch(rows[i:i + self.local_batch])
            with self._autocast():
                logits = self.head(*self._inputs(batch))
            target = batch["target"].to(self.device)
            losses.append(dice_ce_loss(logits, target).item())
            counts += confusion_counts(logits.float().cpu(), target.cpu())
        counts = self.dist.all_reduce_sum(counts)
        loss = self.dist.all_reduce_sum(torch.tensor([float(np.sum(losses)), len(losses)], dtype=torch.float64))
        tp, fp, fn = counts[1:, 0], counts[1:, 1], counts[1:, 2]
        dice = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).tolist()
        return float(loss[0] / loss[1]) if loss[1] else float("nan"), dice

    # ----------------------------------------------------------------- run description
    def _describe(self) -> str:
        return (f"{self.dataset_name} {self.configuration} fold {self.fold}: head {self.head_name}, "
                f"{len(self.train_ids)} training / {len(self.val_ids)} validation cases, "
                f"{len(self.train_data)} training inputs ({self._input_kind()}), "
                f"at most {self.num_epochs} epochs x {self.iterations} iterations x batch {self.batch_size}"
                + self._scale_note())

    def _input_kind(self) -> str:
        if self.takes_images:
            return f"augmented images on a {self.image_config['encoder_input_size']} px canvas, no encoder"
        if self.self_training is not None:
            return (f"cached embeddings, plus {self.views.views if self.views else 0} augmented views of each "
                    f"labelled input, and {self.self_training['pseudo_labelled_cases']} pseudo-labelled cases for "
                    f"{1 - self.self_training['labelled_fraction']:.0%} of each batch")
        if self.views is not None:
            return f"cached embeddings, plus {self.views.views} augmented views of each labelled input, encoded"
        return "cached embeddings" if self.use_cache else "encoded on the fly"

    def _write_run_files(self) -> None:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        save_json(self.plans, self.model_dir / "plans.json")
        for name in ("dataset.json", "dataset_fingerprint.json"):
            if (self.pp_folder / name).is_file():
                shutil.copyfile(self.pp_folder / name, self.model_dir / name)
        save_json({"trainer": self.trainer, "head": self.head_name, "configuration": self.configuration,
                   "fold": str(self.fold), "num_epochs": self.num_epochs, "iterations_per_epoch": self.iterations,
                   "batch_size": self.batch_size, "num_labeled_cases": self.num_labeled_cases,
                   "train_cases": self.train_ids, "val_cases": self.val_ids, "use_cache": bool(self.use_cache),
                   "device": str(self.device), "seed": self.seed, "processes": self.dist.world_size,
                   "device_plan": self.device_plan, "compiled": self.compile_model, "initial_lr": self.initial_lr,
                   "early_stopping_patience": self.patience,
                   "augmented_views": self.views.views if self.views is not None else 0,
                   "pretrained_weights": str(self.pretrained_weights) if self.pretrained_weights else None,
                   "self_training": self.self_training},
                  self.output / "debug.json")

    # ----------------------------------------------------------------- final validation
    def final_validation(self, checkpoint: str = "checkpoint_final.pth", save_probabilities: bool = False,
                         cache_tta_views: bool = False) -> dict:
        """Predict the fold's validation cases in their original geometry and evaluate them (``summary.json``);
        resumable per case (``samunet.training.final_validation``)."""
        from samunet.training.final_validation import final_validation
        return final_validation(self, checkpoint, save_probabilities, cache_tta_views)


def run_training(dataset, configuration: str, fold, head=None, epochs=None, iterations_per_epoch=None,
                 num_labeled_cases=None, continue_training=False, validation_only=False, device="auto",
                 save_probabilities=False, use_cache=None, checkpoint="checkpoint_final.pth",
                 batch_size=None, patience=None, augmented_views=None, pretrained_weights=None,
                 plans_name="samunetPlans", compile_model=False, cooldown=None, cache_tta_views=False,
                 self_training=False, unlabeled_folder=None, pseudo_label_tta=False) -> Trainer:
    """Train one fold (or, with ``validation_only``, only rerun its final validation)."""
    t = Trainer(dataset, configuration, fold, head=head, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                num_labeled_cases=num_labeled_cases, device=device, use_cache=use_cache, batch_size=batch_size,
                patience=patience, augmented_views=augmented_views, pretrained_weights=pretrained_weights,
                plans_name=plans_name, compile_model=compile_model, cooldown=cooldown, self_training=self_training,
                unlabeled_folder=unlabeled_folder, pseudo_label_tta=pseudo_label_tta)
    if not validation_only:
        t.run(continue_training)
    t.final_validation(checkpoint, save_probabilities, cache_tta_views)
    return t
