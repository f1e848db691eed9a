"""PackedSFTTrainer: the Trainer with throughput logging (tokens/s, peak memory, MFU on known GPUs) for packed
supervised fine-tuning.

Plain fine-tuning needs no loss code here: transformers' Trainer already divides the summed token loss by the
number of label tokens of the whole effective batch (`num_items_in_batch`, counted over every
gradient-accumulation micro-batch and, with `average_tokens_across_devices`, over every process),
which is the release's "mean over every label token" objective. The optimizer comes in through
`optimizer_cls_and_kwargs` (default: AnyPrecisionAdamW with bf16 moments). With a `Distiller` the loss
is its mix of KL to the teacher and CE, normalized the same way (module/train/distill.py).
"""

from __future__ import annotations

import time

from transformers import Trainer

from utils.report import peak_flops, peak_memory_bytes, train_flops_per_token


class PackedSFTTrainer(Trainer):
    def __init__(self, *args, distiller=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distiller = distiller
        if distiller is not None:
            self.loss_is_scaled_for_ga = True  # divided by the label tokens of the whole effective batch
        self._tokens = 0
        self._label_tokens = 0
        self._start: float | None = None
        self._flops_per_token: float | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._start is None:
            self._start = time.perf_counter()
        self._tokens += int(inputs["input_ids"].numel())
        self._label_tokens += int((inputs["labels"] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.distiller is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = self.distiller.loss(outputs.logits, inputs, labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as the Trainer does for its own token-normalized loss
        return (loss, outputs) if return_outputs else loss

    def mfu(self, tokens_per_second: float) -> float | None:
        """Model FLOPs utilisation of all processes (utils/report.py's FLOPs per token over the cards' bf16 peak);
        None where the card's peak is unknown (e.g. CPU)."""
        peak = peak_flops(self.args.device)
        if peak is None:
            return None
        if self._flops_per_token is None:
            self._flops_per_token = train_flops_per_token(self.model)
        return tokens_per_second * self._flops_per_token / (peak * self.args.world_size)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.distiller is not None and "loss" in logs:
            logs.update(self.distiller.log_terms())
        if self._start is not None and "loss" in logs:
            seconds = max(time.perf_counter() - self._start, 1e-9)
            logs["tokens_per_second"] = round(self._tokens * self.args.world_size / seconds, 1)
            logs["label_tokens_per_second"] = round(self._label_tokens * self.args.world_size / seconds, 1)
            logs["peak_memory_gb"] = round(peak_memory_bytes(self.args.device) / 2**30, 2)
            mfu = self.mfu(logs["tokens_per_second"])
            if mfu is not None:
                logs["mfu"] = round(mfu, 4)
        super().log(logs, start_time)
