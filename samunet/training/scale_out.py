"""What a trainer does differently on a GPU and across processes, kept apart from what it trains.

``ScaleOut`` is mixed into the head trainer (``trainer.py``), which sets ``self.dist`` (``distributed.py``),
``self.device``, ``self.head`` and the plans before calling these:

    _plan_for_device(batch_size, use_cache)   on a GPU, the planner's device rules for what the user left open
    _wrap_for_training()                      channels-last, torch.compile, DistributedDataParallel
    _scale_note() -> str                      the log's statement of global batch, processes and learning rate
"""
from __future__ import annotations

import torch


class ScaleOut:
    def _plan_for_device(self, batch_size, use_cache) -> None:
        """On a GPU: the planner's device rules (batch size from its memory, on-the-fly encoding where the encoder
        is cheap there) for whatever the user left to the plans."""
        from samunet.models.gpu import gpu_facts
        from samunet.models.specs import get_encoder_spec
        from samunet.planning.device_rules import device_training_plan
        facts = gpu_facts(self.device.index or 0)
        n_enc = len(self.plans["channel_names"]) if self.config["channel_rule"]["type"] == "encode_each_and_fuse" \
            else 1
        plan = device_training_plan(self.config, get_encoder_spec(self.plans["encoder"]["name"]), self.head_name,
                                    facts["memory_gb"], facts["bf16_tflops"], n_enc, self.num_classes,
                                    self.iterations)
        self.device_plan = {"device": facts["name"], **plan}
        if batch_size is None:
            self.batch_size = plan["batch_size"]  # the global batch, whatever the number of processes
        if use_cache is None and plan["on_the_fly"] and int(self.config.get("embedding_context", 1)) == 1:
            self.use_cache = False

    def _wrap_for_training(self) -> None:
        """The model the training step calls: channels-last on a GPU for convolutional models, optionally
        ``torch.compile``d, in DistributedDataParallel under torchrun. ``self.head`` stays the plain model (weights,
        checkpoints, validation)."""
        from samunet.models.gpu import prefer_channels_last
        if self.head_name in ("unet", "hybrid", "cnn"):
            prefer_channels_last(self.head, self.device)
        model = torch.compile(self.head) if self.compile_model else self.head
        self.train_head = self.dist.wrap(model)

    def _scale_note(self) -> str:
        """How the batch is spread over processes, the learning-rate rule, and the device's choices."""
        note = ""
        if self.dist.active:
            note = (f"; {self.dist.world_size} processes ({self.dist.backend}), global batch {self.batch_size} = "
                    f"{self.dist.world_size} x ~{self.local_batch} per process; learning rate {self.initial_lr:g} "
                    f"as for one process: the global batch and the iterations per epoch do not depend on the "
                    f"number of processes, so --c may resume with another number")
        if self.device_plan is not None:
            note += (f"; on {self.device_plan['device']}: batch {self.device_plan['batch_size_reason']}; "
                     f"encoding: {self.device_plan['on_the_fly_reason']}")
        if self.compile_model:
            note += "; the model is compiled with torch.compile"
        return note
