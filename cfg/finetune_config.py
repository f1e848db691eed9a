"""Settings of fintune_full.py and fintune_lora.py.

Defaults are the release's (its cfg/prune_llama.py and training scripts): full fine-tuning with
lr 1e-4, 3 epochs, weight decay 0.05, cosine schedule, batch 1 x 32 accumulation, bf16, gradient
checkpointing, AdamW with bf16 moments; LoRA r 32, alpha 64, dropout 0.05 on all seven projections,
lr 4e-4 (the release's scripts), 2 epochs, no weight decay; 1024-token examples, packed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from dataset.packing.packed_dataset import STRATEGIES
from utils.cli import parse_dataclasses

ATTENTION = ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager")


def check_learning_rate(value: float, flag: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} {value:g} is not valid; a learning rate must be a finite number > 0, e.g. 1e-4")


@dataclass
class SFTArguments:
    model: str = field(metadata={"help": "Model to fine-tune: a (pruned) HF folder or a hub id."})
    dataset_name: str = field(
        default="lamini",
        metadata={"help": "lamini (MBZUAI/LaMini-instruction), alpaca, a hub id, or a local .json/.jsonl/.parquet "
                  "file, folder or save_to_disk folder."},
    )  # fmt: skip
    tokenizer_max: int = field(default=1024, metadata={"help": "Truncate each example to this many tokens."})
    pack_length: int = field(default=0, metadata={"help": "Tokens per packed row (0 = --tokenizer_max)."})
    packing: str = field(
        default="bfd", metadata={"help": f"{', '.join(STRATEGIES)} (best-fit decreasing) or none (padded batches)."}
    )
    train_on_inputs: bool = field(default=False, metadata={"help": "Also train on the prompt tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})
    data_cache: str = field(default="out/cache/sft", metadata={"help": "Tokenized-data cache folder ('' = off)."})
    lr: float | None = field(default=None, metadata={"help": "The release's name for --learning_rate."})
    ft_parts: str = field(default="all", metadata={"help": "all, or mlp: train (or adapt) only the MLP projections."})
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto = flash_attention_2 if installed on CUDA, else flex_attention on CUDA, else sdpa."},
    )
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto (bf16 on CUDA, fp32 on CPU), "
                                                         "bfloat16 or float32."})  # fmt: skip
    optimizer: str = field(default="anyprecision", metadata={"help": "anyprecision (AnyPrecisionAdamW) or adamw."})
    momentum_dtype: str = field(default="bfloat16", metadata={"help": "AnyPrecisionAdamW first-moment dtype."})
    variance_dtype: str = field(default="bfloat16", metadata={"help": "AnyPrecisionAdamW second-moment dtype."})
    use_kahan_summation: bool = field(default=False, metadata={"help": "Kahan-compensated weight updates."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir (not resuming)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    allow_long_context: bool = field(
        default=False,
        metadata={"help": "Allow rows longer than the model's max_position_embeddings (rotary positions only)."},
    )
    text_field: str | None = field(
        default=None,
        metadata={"help": "Train on plain text instead of instructions: the records' field holding it (a .txt/.raw "
                  "--dataset_name is text already). Documents are joined with EOS into full --pack_length rows."},
    )  # fmt: skip
    distill_from: str | None = field(
        default=None,
        metadata={"help": "Distill from this model (the dense original): loss = alpha * KL(teacher || student) + "
                  "(1 - alpha) * CE over the label tokens."},
    )  # fmt: skip
    distill_alpha: float = field(default=1.0, metadata={"help": "Weight of the KL term (1 = KL only, Minitron's)."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term."})
    teacher_device: str | None = field(
        default=None, metadata={"help": "Device of the teacher (default: the student's), e.g. cuda:1."}
    )

    def __post_init__(self) -> None:
        self.pack_length = self.pack_length or self.tokenizer_max
        if not (math.isfinite(self.distill_alpha) and 0 <= self.distill_alpha <= 1):
            raise ValueError(f"--distill_alpha must be in [0, 1] (got {self.distill_alpha})")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise ValueError(f"--distill_temperature must be > 0 (got {self.distill_temperature})")
        if self.tokenizer_max < 2:
            raise ValueError(f"--tokenizer_max must be >= 2 (got {self.tokenizer_max})")
        if self.packing != "none" and self.tokenizer_max > self.pack_length:
            raise ValueError(f"--tokenizer_max {self.tokenizer_max} is larger than --pack_length {self.pack_length}")
        if self.packing not in (*STRATEGIES, "none"):
            raise ValueError(f"--packing {self.packing!r} is not one of {', '.join((*STRATEGIES, 'none'))}")
        if self.ft_parts not in ("all", "mlp"):
            raise ValueError(f"--ft_parts {self.ft_parts!r} is not one of all, mlp")
        if self.attn_implementation not in ATTENTION:
            raise ValueError(f"--attn_implementation {self.attn_implementation!r} is not one of {', '.join(ATTENTION)}")
        if self.optimizer not in ("anyprecision", "adamw"):
            raise ValueError(f"--optimizer {self.optimizer!r} is not one of anyprecision, adamw")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"--dtype {self.dtype!r} is not one of auto, bfloat16, float32")
        if self.lr is not None:
            check_learning_rate(self.lr, "--lr")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max_train_samples must be >= 1 (got {self.max_train_samples})")


@dataclass
class LoraArguments:
    lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj,up_proj",
        metadata={"help": "Comma list of module names to adapt (--ft_parts mlp keeps only the MLP ones)."},
    )
    merge: bool = field(default=False, metadata={"help": "Also write a merged standalone model to OUTPUT/merged."})


@dataclass
class FullTrainingArguments(TrainingArguments):
    """TrainingArguments with the release's full fine-tuning defaults."""

    output_dir: str | None = field(default=None, metadata={"help": "Run folder (default: out/<model>-full-<time>)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs."})
    weight_decay: float = field(default=0.05, metadata={"help": "Decoupled weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Packed rows per device and step."})
    gradient_accumulation_steps: int = field(default=32, metadata={"help": "Steps accumulated per update."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N updates."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N updates."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep position_ids for packing."})

    def __post_init__(self) -> None:
        check_learning_rate(self.learning_rate, "--learning_rate")
        super().__post_init__()


@dataclass
class LoraTrainingArguments(FullTrainingArguments):
    """TrainingArguments with the release's LoRA defaults."""

    learning_rate: float = field(default=4e-4, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay."})


def parse_finetune_args(argv: list[str], lora_mode: bool) -> tuple[SFTArguments, LoraArguments | None,
                                                                   FullTrainingArguments]:  # fmt: skip
    """The settings of fintune_lora.py (`lora_mode`) or fintune_full.py from `argv` (`--config FILE.yaml` anywhere
    supplies defaults): the data/model settings, the LoRA settings (None for full fine-tuning), the Trainer's."""
    if lora_mode:
        return parse_dataclasses((SFTArguments, LoraArguments, LoraTrainingArguments), argv)
    sft, args = parse_dataclasses((SFTArguments, FullTrainingArguments), argv)
    return sft, None, args
