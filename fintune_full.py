"""Recovery by full fine-tuning of a pruned model on instruction data, packed, through the Trainer.

    # the paper's setting on 4 GPUs (LaMini, 1024-token packed rows, bf16, AnyPrecisionAdamW)
    accelerate launch --config_file cfg/accelerate/ddp_4gpu.yaml fintune_full.py \\
        --model out/Llama-2-7b-hf-entropy-pr0.2-s42 --output_dir out/llama2-pr0.2-full
    # CPU smoke run on the shared LaMini sample
    python fintune_full.py --model models/SmolLM2-135M-Instruct --dataset_name ../shared/data/instruct/lamini \\
        --tokenizer_max 256 --max_steps 3 --gradient_accumulation_steps 1 --gradient_checkpointing false
    # the release's flags work too: --lr, --gradient_accumulation_steps, --dataset_name, --tokenizer_max, --ft_parts
"""

import sys

from cfg.finetune_config import parse_finetune_args
from module.train.sft import sft_main


def main(argv: list[str] | None = None, callbacks=()) -> int:
    return sft_main(lambda: parse_finetune_args(sys.argv[1:] if argv is None else argv, lora_mode=False), callbacks)


if __name__ == "__main__":
    sys.exit(main())
