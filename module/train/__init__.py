"""Recovery fine-tuning (fintune_full.py, fintune_lora.py): the data path and the run (sft.py), the packed-sequence
Trainer (trainer.py), AdamW with low-precision states and Kahan summation (optim.py), distillation from the dense
model (distill.py).
"""
