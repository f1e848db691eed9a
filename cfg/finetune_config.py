"""Settings of fintune_full.py and fintune_lora.py.

Defaults are the release's (its cfg/prune_llama.py and training scripts): full fine-tuning with
lr 1e-4, 3 epochs, weight decay 0.05, cosine schedule, batch 1 x 32 accumulation, bf16, gradient
checkpointing, AdamW with bf16 moments; LoRA r 32, alpha 64, dropout 0.05 on all seven projections,
lr 4e-4 (the release's scripts), 2 epochs, no weight decay; 1024-token examples, packed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from transformers import TrainingArguments

from dataset.calibration import TEXT_SUFFIXES
from dataset.packing.packed_dataset import STRATEGIES
from utils.cli import parse_dataclasses, parse_device
from utils.validate import Rule, check_applies, check_ranges

ATTENTION = ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager")


def check_learning_rate(value: float, flag: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} {value:g} is not valid; a learning rate must be a finite number > 0, e.g. 1e-4")


@dataclass
class SFTArguments:
    """The data, model and objective of a fine-tuning run; RULES: the numbers' ranges and where flags apply
    (utils/validate.py)."""

    KINDS: ClassVar[dict[str, str]] = {
        "distill": "distillation (--distill_from)",
        "anyprecision": "--optimizer anyprecision",
        "packed": "packed rows (--packing bfd/consecutive, or plain text)",
        "instructions": "instruction data (not plain text: no --text_field, no .txt/.raw --dataset_name)",
    }
    RULES: ClassVar[dict[str, Rule]] = {
        "tokenizer_max": Rule(low=2),
        "pack_length": Rule(low=2, applies=("packed",)),
        "train_on_inputs": Rule(applies=("instructions",)),
        "max_train_samples": Rule(low=1),
        "lr": Rule(low=0, low_open=True),
        "momentum_dtype": Rule(applies=("anyprecision",)),
        "variance_dtype": Rule(applies=("anyprecision",)),
        "use_kahan_summation": Rule(applies=("anyprecision",)),
        "distill_alpha": Rule(low=0, high=1, applies=("distill",)),
        "distill_temperature": Rule(low=0, low_open=True, applies=("distill",)),
        "teacher_device": Rule(applies=("distill",)),
    }

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
        if self.lr is not None:
            check_learning_rate(self.lr, "--lr")
        check_ranges(self)
        if self.teacher_device:
            parse_device(self.teacher_device, "--teacher_device")
        check_applies(self)  # before defaults fill in: what the user gave is what is judged
        self.pack_length = self.pack_length or self.tokenizer_max
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
        for flag, dtype in (("--dtype", self.dtype), ("--momentum_dtype", self.momentum_dtype),
                            ("--variance_dtype", self.variance_dtype)):  # fmt: skip
            valid = ("auto", "bfloat16", "float32") if flag == "--dtype" else ("bfloat16", "float16", "float32")
            if dtype not in valid:
                raise ValueError(f"{flag} {dtype!r} is not one of {', '.join(valid)}")

    @property
    def text(self) -> bool:
        """Plain text (every token a label, packed into full rows) rather than instruction records."""
        return self.text_field is not None or Path(self.dataset_name).suffix in TEXT_SUFFIXES

    def kinds(self) -> set[str]:
        kinds = set()
        if self.text or self.packing != "none":
            kinds.add("packed")
        if not self.text:
            kinds.add("instructions")
        if self.distill_from:
            kinds.add("distill")
        if self.optimizer == "anyprecision":
            kinds.add("anyprecision")
        return kinds

    def run_text(self) -> str:
        data = "plain text" if self.text else "instruction data"
        return f"this fine-tuning run ({data}, --optimizer {self.optimizer}, --packing {self.packing})"


@dataclass
class LoraArguments:
    RULES: ClassVar[dict[str, Rule]] = {"lora_r": Rule(low=1), "lora_alpha": Rule(low=0, low_open=True),
                                        "lora_dropout": Rule(low=0, high=1, high_open=True)}  # fmt: skip

    lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj,up_proj",
        metadata={"help": "Comma list of module names to adapt (--ft_parts mlp keeps only the MLP ones)."},
    )
    merge: bool = field(default=False, metadata={"help": "Also write a merged standalone model to OUTPUT/merged."})

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class FullTrainingArguments(TrainingArguments):
    """TrainingArguments with the release's full fine-tuning defaults (RULES: ranges of the numbers set here)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "learning_rate": Rule(low=0, low_open=True), "num_train_epochs": Rule(low=0, low_open=True),
        "weight_decay": Rule(low=0), "per_device_train_batch_size": Rule(low=1),
        "gradient_accumulation_steps": Rule(low=1), "logging_steps": Rule(low=0, low_open=True),
        "save_steps": Rule(low=0, low_open=True),
    }  # fmt: skip

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
        check_ranges(self)
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
