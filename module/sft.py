"""Recovery fine-tuning shared by fintune_full.py and fintune_lora.py: data -> packing -> model -> Trainer."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cfg.finetune_config import FullTrainingArguments, LoraArguments, LoraTrainingArguments, SFTArguments
from dataset.LaMini_dataset import tokenized_dataset
from dataset.packing.packed_dataset import Collator, pack_examples
from module.adapters import find_mlps
from module.anyprecisionAdamw import AnyPrecisionAdamW
from module.trainer import PackedSFTTrainer
from utils.cli import load_causal_lm, load_tokenizer
from utils.errors import UserError, run_cli
from utils.report import plot_loss_curve, versions, write_json

log = logging.getLogger("hfprune")


def choose_attention(requested: str, cuda: bool) -> str:
    """flash_attention_2 when installed on CUDA, else flex_attention on CUDA, else sdpa."""
    if requested != "auto":
        return requested
    if not cuda:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "flex_attention"


def mlp_module_names(model) -> set[str]:
    """Names of the MLP projection modules (for --ft_parts mlp)."""
    mlps = find_mlps(model)
    shape = mlps.shape
    return {*shape.inputs, shape.output}


def optimizer_spec(sft: SFTArguments, args) -> tuple | None:
    if sft.optimizer != "anyprecision":
        return None
    return AnyPrecisionAdamW, {
        "lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
        "momentum_dtype": sft.momentum_dtype, "variance_dtype": sft.variance_dtype,
        "use_kahan_summation": sft.use_kahan_summation,
    }  # fmt: skip


def prepare_output(args, sft: SFTArguments, kind: str) -> Path:
    if not args.output_dir:
        args.output_dir = f"out/{Path(sft.model.rstrip('/')).name}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.output_dir)
    resuming = args.resume_from_checkpoint not in (None, "", False)
    if out.exists() and any(out.iterdir()) and not resuming:
        if not sft.overwrite:
            raise UserError(f"--output_dir {out} already holds a run; pass --resume_from_checkpoint or --overwrite")
        import shutil

        shutil.rmtree(out)
    model_dir = Path(sft.model).expanduser()
    if model_dir.exists() and (out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents):
        raise UserError(f"--output_dir {out} is inside the model folder {model_dir}")
    return out


def build(sft: SFTArguments, args, lora: LoraArguments | None, callbacks=()):
    """The trainer, its tokenizer and a summary of the data."""
    cuda = torch.cuda.is_available() and not args.use_cpu
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[sft.dtype]  # fmt: skip
    if dtype == torch.bfloat16 and cuda:
        args.bf16 = True
    if sft.lr is not None:
        args.learning_rate = sft.lr
    tokenizer = load_tokenizer(sft.model, "--model", sft.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with args.main_process_first(desc="tokenize"):
        rows = tokenized_dataset(sft.dataset_name, tokenizer, sft.tokenizer_max, sft.train_on_inputs,
                                 sft.data_cache or None, sft.max_train_samples)  # fmt: skip
    n_examples = len(rows)
    fill = None
    if sft.packing == "none":
        collator = Collator(tokenizer.pad_token_id, packed=False)
    else:
        rows, fill = pack_examples(rows, sft.pack_length, sft.packing)
        collator = Collator(tokenizer.pad_token_id)
        log.info("packing (%s): %d examples into %d rows of <= %d tokens, fill %.3f",
                 sft.packing, n_examples, len(rows), sft.pack_length, fill)  # fmt: skip
    attn = choose_attention(sft.attn_implementation, cuda)
    model = load_causal_lm(sft.model, "--model", dtype, sft.trust_remote_code, attn_implementation=attn)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        args.gradient_checkpointing_kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
    mlp_names = mlp_module_names(model) if sft.ft_parts == "mlp" else None
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in lora.lora_target_modules.split(",") if t.strip()]
        if mlp_names is not None:
            targets = [t for t in targets if t in mlp_names] or sorted(mlp_names)
        config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                            target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, config)
    elif mlp_names is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(any(f".{m}." in f".{name}" for m in mlp_names))
    trainer = PackedSFTTrainer(
        model=model, args=args, train_dataset=rows, data_collator=collator,
        optimizer_cls_and_kwargs=optimizer_spec(sft, args), callbacks=list(callbacks),
    )  # fmt: skip
    data = {"examples": n_examples, "rows": len(rows), "fill_ratio": fill, "attn_implementation": attn,
            "dtype": str(dtype)}  # fmt: skip
    return trainer, tokenizer, data


def run_sft(argv: list[str], lora_mode: bool, callbacks=()) -> Path:
    """Parse, train, save. Returns the run folder."""
    from transformers import HfArgumentParser

    from utils.cli import expand_recipe

    classes = (
        (SFTArguments, LoraArguments, LoraTrainingArguments) if lora_mode else (SFTArguments, FullTrainingArguments)
    )
    parser = HfArgumentParser(classes)
    try:
        parsed = parser.parse_args_into_dataclasses(args=expand_recipe(argv))
    except ValueError as err:
        raise UserError(str(err)) from None
    sft, args = parsed[0], parsed[-1]
    lora = parsed[1] if lora_mode else None
    out = prepare_output(args, sft, "lora" if lora_mode else "full")
    log.info("config: %s", json.dumps({"sft": asdict(sft), "lora": asdict(lora) if lora else None,
                                       "training": args.to_dict()}, default=str))  # fmt: skip
    trainer, tokenizer, data = build(sft, args, lora, callbacks)
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    result = trainer.train(resume_from_checkpoint=resume or None)
    if trainer.is_world_process_zero():
        trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))
        if lora is not None and lora.merge:
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(str(out / "merged"))
            tokenizer.save_pretrained(str(out / "merged"))
        plot_loss_curve(out / "loss_curve.png", trainer.state.log_history,
                        f"{Path(sft.model.rstrip('/')).name}: {'LoRA' if lora else 'full'} fine-tuning")  # fmt: skip
        write_json(out / "train_report.json", {
            "sft": asdict(sft), "lora": asdict(lora) if lora else None, "training": args.to_dict(), "data": data,
            "metrics": result.metrics, "log_history": trainer.state.log_history, "versions": versions(),
        })  # fmt: skip
    return out


def sft_main(argv: list[str] | None, lora_mode: bool, callbacks=()) -> int:
    """Entry point body of both scripts: one error line and exit status 2 on bad input."""
    import sys

    from utils.report import setup_logging

    setup_logging()
    args = sys.argv[1:] if argv is None else argv
    return run_cli(lambda: print(f"saved to {run_sft(args, lora_mode=lora_mode, callbacks=callbacks)}"))
