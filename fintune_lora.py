"""Recovery by LoRA fine-tuning (peft) of a pruned model; optionally merge into a standalone model.

    # the paper's LoRA setting on 4 GPUs: r 32, alpha 64, dropout 0.05, all seven projections, lr 4e-4
    accelerate launch --config_file cfg/accelerate/ddp_4gpu.yaml fintune_lora.py \\
        --model out/Llama-2-7b-hf-entropy-pr0.2-s42 --output_dir out/llama2-pr0.2-lora --merge
    # CPU smoke run
    python fintune_lora.py --model models/SmolLM2-135M-Instruct --dataset_name ../shared/data/instruct/lamini \\
        --tokenizer_max 256 --max_steps 3 --gradient_accumulation_steps 1 --gradient_checkpointing false --merge
    # evaluate: bash script/eval.sh MODEL OUTPUT_DIR   (adapter via peft=)  or  bash script/eval.sh OUTPUT_DIR/merged
"""

import sys

from cfg.finetune_config import parse_finetune_args
from module.train.sft import sft_main


def main(argv: list[str] | None = None, callbacks=()) -> int:
    return sft_main(lambda: parse_finetune_args(sys.argv[1:] if argv is None else argv, lora_mode=True), callbacks)


if __name__ == "__main__":
    sys.exit(main())
