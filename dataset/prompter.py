"""The Alpaca prompt templates (with and without an input), as the release and LaMini use them."""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Prompter:
    """Builds the prompt; the response follows it directly and is what the loss is taken on."""

    with_input: str = PROMPT_INPUT
    without_input: str = PROMPT_NO_INPUT

    def prompt(self, instruction: str, input: str | None = None) -> str:  # noqa: A002 - Alpaca's field name
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)

    @property
    def fingerprint(self) -> str:
        return self.with_input + "\x00" + self.without_input
