"""Recovery fine-tuning shared by fintune_full.py and fintune_lora.py: data -> packing -> model -> Trainer.

`run_sft(sft, lora, args)` takes the parsed settings (cfg/finetune_config.py: `parse_finetune_args`) and returns
the run folder; benchmarks call it the same way the two entry scripts do.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from transformers.trainer_utils import enable_full_determinism, set_seed

from dataset.calibration import load_documents
from dataset.LaMini_dataset import tokenized_dataset
from dataset.packing.packed_dataset import Collator, pack_examples, pack_text
from module.model.mlp import find_mlps
from module.train.distill import Distiller, check_teacher
from module.train.optim import AnyPrecisionAdamW
from module.train.trainer import PackedSFTTrainer
from utils.atomic import apply_umask, atomic_dir, swap_into, writer_tag
from utils.cli import check_context, check_weights, load_causal_lm, load_config, load_tokenizer, meta_model
from utils.errors import UserError, run_cli
from utils.outputs import check_output, claim
from utils.report import plot_loss_curve, setup_logging, versions, write_json

log = logging.getLogger("hfprune")


# flex_attention's kernels work in blocks of 128 tokens; torch 2.11's compiled kernel found no valid
# configuration for a 111-token row on an H200 (the GPU check, 2026-11-30), so its rows are padded to a multiple.
FLEX_BLOCK = 128


def row_multiple(attn_implementation: str) -> int:
    """What the collator rounds each batch's width up to for this attention implementation."""
    return FLEX_BLOCK if attn_implementation == "flex_attention" else 1


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


def optimizer_spec(sft, args) -> tuple | None:
    if sft.optimizer != "anyprecision":
        return None
    return AnyPrecisionAdamW, {
        "lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
        "momentum_dtype": sft.momentum_dtype, "variance_dtype": sft.variance_dtype,
        "use_kahan_summation": sft.use_kahan_summation,
    }  # fmt: skip


def output_folder(args, sft, lora) -> Path:
    """--output_dir, or a new descriptive folder under out/."""
    if not args.output_dir:
        kind = "full" if lora is None else "lora"
        args.output_dir = f"out/{Path(sft.model.rstrip('/')).name}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(args.output_dir)


def resuming(args) -> bool:
    return args.resume_from_checkpoint not in (None, "", False)


def check_run_output(out: Path, sft, args) -> bool:
    """One line for an output that would touch an input of the run or an earlier run without --overwrite; True
    when an earlier run is there to be replaced (only once the new one is complete)."""
    earlier = out.is_dir() and any(out.iterdir())
    if earlier and not (sft.overwrite or resuming(args)):
        raise UserError(f"--output_dir {out} already holds a run; pass --resume_from_checkpoint or --overwrite")
    inputs = {"--model": sft.model, "--distill_from": sft.distill_from, "--dataset_name": sft.dataset_name,
              "--data_cache": Path(sft.data_cache) if sft.data_cache else None}  # fmt: skip
    check_output(out, inputs, overwrite=True)
    return earlier and not resuming(args)


def shared_tag(args) -> str:
    """Rank 0's writer tag on every rank: the temporary folder an --overwrite run trains in has one name."""
    box = [writer_tag()]
    if args.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0)
    return box[0]


def resume_checkpoint(out: Path, requested) -> str | None:
    """The checkpoint to resume from: `last`/True means the newest *complete* one in `out`.

    The Trainer writes a checkpoint in place, its trainer_state.json last, so a run killed while saving
    leaves a checkpoint without it. Such leftovers newer than the one resumed from are removed (the
    resumed run writes those steps again); an explicitly named incomplete checkpoint is an error.
    """
    if requested in (None, "", False):
        return None
    if isinstance(requested, str) and requested.lower() not in ("true", "last"):
        ckpt = Path(requested)
        if not ckpt.is_dir():
            raise UserError(f"--resume_from_checkpoint {requested}: no such folder")
        if not (ckpt / "trainer_state.json").is_file():
            raise UserError(f"--resume_from_checkpoint {requested} is incomplete (no trainer_state.json: the run "
                            "was killed while saving it); name an earlier checkpoint or pass last")  # fmt: skip
        return str(ckpt)
    steps = {p: re.fullmatch(r"checkpoint-(\d+)", p.name) for p in out.glob("checkpoint-*") if p.is_dir()}
    found = sorted((int(m[1]), p) for p, m in steps.items() if m)
    complete = [p for _, p in found if (p / "trainer_state.json").is_file()]
    if not complete:
        raise UserError(f"--resume_from_checkpoint {requested}: no complete checkpoint in {out}")
    for step, p in found:
        if step > int(complete[-1].name.split("-")[1]):
            shutil.rmtree(p, ignore_errors=True)  # every rank of a distributed run may get here
            log.warning("removed %s: incomplete (the run was killed while saving it)", p)
    return str(complete[-1])


def remove_if_empty(folder: Path) -> None:
    """Remove `folder` when it holds no file at any depth (what a run that failed before saving leaves)."""
    if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
        shutil.rmtree(folder)


def teacher_tokenizer(sft):
    """The teacher's own tokenizer, or None when its folder has none (a bare model folder)."""
    try:
        return load_tokenizer(sft.distill_from, "--distill_from", sft.trust_remote_code)
    except (UserError, OSError, ValueError):
        return None


def build(sft, args, lora, callbacks=()):
    """The trainer, its tokenizer and a summary of the data."""
    # Seed before anything random is built (LoRA's A matrices): the Trainer seeds only in its own
    # __init__, after get_peft_model, so two runs with one --seed would start from different adapters.
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
    cuda = torch.cuda.is_available() and not args.use_cpu
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[sft.dtype]  # fmt: skip
    if dtype == torch.bfloat16 and cuda:
        args.bf16 = True
    if sft.lr is not None:
        args.learning_rate = sft.lr
    # the config alone decides these: refuse before tokenizing data and loading weights
    shapes = meta_model(load_config(sft.model, "--model", sft.trust_remote_code), sft.trust_remote_code, "--model")
    check_weights(sft.model, shapes, "--model")
    row_length = sft.tokenizer_max if sft.packing == "none" else sft.pack_length
    check_context(shapes, row_length, "--pack_length" if sft.packing != "none" else "--tokenizer_max",
                  sft.allow_long_context)  # fmt: skip
    tokenizer = load_tokenizer(sft.model, "--model", sft.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if sft.distill_from:  # refuse a teacher that cannot teach this student before loading anything big
        teacher_config = load_config(sft.distill_from, "--distill_from", sft.trust_remote_code)
        check_teacher(shapes.config, teacher_config, tokenizer, teacher_tokenizer(sft), sft.distill_from)
        teacher_shapes = meta_model(teacher_config, sft.trust_remote_code, "--distill_from")
        check_weights(sft.distill_from, teacher_shapes, "--distill_from")
    text = sft.text
    fill = None
    if text:
        docs = load_documents(sft.dataset_name, sft.text_field or "text", "--dataset_name", "--text_field")
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        rows = pack_text(ids, sft.pack_length, tokenizer.eos_token_id)[: sft.max_train_samples]
        if not rows:
            raise UserError(f"--dataset_name {sft.dataset_name} holds fewer than {sft.pack_length} tokens")
        n_examples, fill = len(docs), 1.0
        log.info("plain text: %d documents into %d full rows of %d tokens", len(docs), len(rows), sft.pack_length)
    else:
        with args.main_process_first(desc="tokenize"):
            rows = tokenized_dataset(sft.dataset_name, tokenizer, sft.tokenizer_max, sft.train_on_inputs,
                                     sft.data_cache or None, sft.max_train_samples)  # fmt: skip
        n_examples = len(rows)
    attn = choose_attention(sft.attn_implementation, cuda)
    packed = text or sft.packing != "none"
    collator = Collator(tokenizer.pad_token_id, packed=packed, pad_to_multiple_of=row_multiple(attn))
    if packed and not text:
        rows, fill = pack_examples(rows, sft.pack_length, sft.packing)
        log.info("packing (%s): %d examples into %d rows of <= %d tokens, fill %.3f",
                 sft.packing, n_examples, len(rows), sft.pack_length, fill)  # fmt: skip
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
    distiller = None
    if sft.distill_from:
        teacher = load_causal_lm(sft.distill_from, "--distill_from", dtype, sft.trust_remote_code,
                                 attn_implementation=attn)  # fmt: skip
        teacher.to(sft.teacher_device or args.device)
        distiller = Distiller(teacher, sft.distill_alpha, sft.distill_temperature)
        log.info("distilling from %s on %s: alpha %g, temperature %g", sft.distill_from, distiller.device,
                 sft.distill_alpha, sft.distill_temperature)  # fmt: skip
    trainer = PackedSFTTrainer(
        model=model, args=args, train_dataset=rows, data_collator=collator,
        optimizer_cls_and_kwargs=optimizer_spec(sft, args), callbacks=list(callbacks), distiller=distiller,
    )  # fmt: skip
    data = {"examples": n_examples, "rows": len(rows), "fill_ratio": fill, "attn_implementation": attn,
            "dtype": str(dtype), "text": text}  # fmt: skip
    return trainer, tokenizer, data


def run_sft(sft, lora, args, callbacks=()) -> Path:
    """Train and save: `sft` (SFTArguments), `lora` (LoraArguments, None for full fine-tuning), `args` (the
    TrainingArguments); returns the run folder. Rank 0 holds a claim on it for the whole run; with --overwrite the
    run trains in a temporary sibling that replaces the earlier run only once it is complete."""
    out = output_folder(args, sft, lora)
    replacing = check_run_output(out, sft, args)
    log.info("config: %s", json.dumps({"sft": asdict(sft), "lora": asdict(lora) if lora else None,
                                       "training": args.to_dict()}, default=str))  # fmt: skip
    work = out.parent / f".{out.name}.tmp-{shared_tag(args)}" if replacing else out
    args.output_dir = str(work)
    with claim([out]) if args.process_index == 0 else nullcontext():
        created = not work.exists()
        try:
            resume = resume_checkpoint(work, args.resume_from_checkpoint)
            trainer, tokenizer, data = build(sft, args, lora, callbacks)
            result = trainer.train(resume_from_checkpoint=resume)
            args.output_dir = str(out)  # what the report records
            if trainer.is_world_process_zero():
                save_run(trainer, tokenizer, sft, lora, args, data, result, work)
                if replacing:
                    swap_into(work, out)
        except BaseException:
            if replacing and args.process_index == 0:
                shutil.rmtree(work, ignore_errors=True)  # the earlier run stays as it was
            elif created:
                remove_if_empty(work)  # a run that failed before its first save leaves nothing behind
            raise
    return out


def last_logged(history: list[dict], key: str):
    """The last value of `key` in the Trainer's log history (None if never logged)."""
    return next((entry[key] for entry in reversed(history) if key in entry), None)


def save_run(trainer, tokenizer, sft, lora, args, data: dict, result, out: Path) -> None:
    """The model (or adapter), tokenizer, merged model, loss curve and report; the report last, as the mark of a
    complete run."""
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    if lora is not None and lora.merge:
        merged = trainer.model.merge_and_unload()
        with atomic_dir(out / "merged") as tmp:
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    plot_loss_curve(out / "loss_curve.png", trainer.state.log_history,
                    f"{Path(sft.model.rstrip('/')).name}: {'LoRA' if lora else 'full'} fine-tuning")  # fmt: skip
    write_json(out / "train_report.json", {
        "sft": asdict(sft), "lora": asdict(lora) if lora else None, "training": args.to_dict(), "data": data,
        "metrics": result.metrics, "log_history": trainer.state.log_history, "versions": versions(),
        "world_size": args.world_size, "mfu": last_logged(trainer.state.log_history, "mfu"),
        "tokens_per_second": last_logged(trainer.state.log_history, "tokens_per_second"),
    })  # fmt: skip
    apply_umask(out)  # the Trainer writes its weights 0600; written last, the report marks a complete run


def sft_main(settings, callbacks=()) -> int:
    """The body of both entry scripts: `settings()` parses the flags (run inside, so bad input is one `error:`
    line and exit status 2), then train and print where the run was saved."""
    setup_logging()

    def train() -> None:
        sft, lora, args = settings()
        print(f"saved to {run_sft(sft, lora, args, callbacks)}")

    return run_cli(train)
