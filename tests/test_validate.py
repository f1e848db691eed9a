"""The one validator (utils/validate.py), with its cases generated from the settings classes themselves: every
number has a range, every range refuses nan, inf and what lies outside it, every flag that a run does not use is
refused in that run. A new flag is covered here as soon as it is declared. Each case runs the real entry point:
one `error:` line, exit 2, and the disk as it was."""

import math
from dataclasses import fields

import pytest
from test_finetune_scripts import common
from test_hardening import tree

import fintune_full
import fintune_lora
import prune
from cfg.finetune_config import FullTrainingArguments, LoraArguments, SFTArguments
from cfg.prune_config import PruneConfig
from utils.validate import Rule, default_of, is_number

CALIB = ["--calib_dataset", "builtin", "--calib_samples", "6", "--seq_len", "24", "--no_progress"]
PRUNE_RUNS = {  # settings that make each kind of prune.py run (checked below to be what they claim)
    "structured": ["--pruning_ratio", "0.1"],
    "magnitude": ["--pruning_ratio", "0.1", "--criterion", "magnitude"],
    "sparse": ["--sparsity", "0.5"],
}
SFT_RUNS = {
    "instructions": [],
    "unpacked": ["--packing", "none"],
    "text": ["--text_field", "text"],
}
EXAMPLES = {  # a valid value away from the default, for every flag with a rule that is not a number
    "pruning_ratio": "0.1", "mlp_ratio": "1.0", "prune_parts": "heads", "mix": "mlp_keep=40", "measure_speed": "true",
    "head_mode": "query", "criterion": "ce", "sparsity_type": "2:4", "sparsity_method": "sparsegpt",
    "sparsity_update": "sparsegpt", "offload_inputs": "true", "activation_checkpointing": "true",
    "importance_cache": "other-cache", "recompute": "true", "train_on_inputs": "true", "momentum_dtype": "float32",
    "variance_dtype": "float32", "use_kahan_summation": "true", "teacher_device": "cpu", "reconstruct": "ls",
    "reconstruct_target": "own", "entropy_form": "fisher", "reconstruct_writers": "all",
    "reconstruct_weighting": "uniform", "reconstruct_select": "obs",
}  # fmt: skip
SETTINGS = [PruneConfig, SFTArguments, LoraArguments, FullTrainingArguments]


def own_fields(cls):
    """The fields a class of ours declares (FullTrainingArguments: the ones it sets, not all of transformers')."""
    names = cls.__annotations__ if cls is FullTrainingArguments else {f.name for f in fields(cls)}
    return [f for f in fields(cls) if f.name in names]


def numbers(cls):
    return [f for f in own_fields(cls) if is_number(default_of(f)) or "int" in str(f.type) or "float" in str(f.type)]


def test_every_number_has_a_range():
    missing = [f"{cls.__name__}.{f.name}" for cls in SETTINGS for f in numbers(cls)
               if not (f.name in cls.RULES and cls.RULES[f.name].bounded)]  # fmt: skip
    assert not missing, f"give these numbers a Rule with bounds in RULES: {missing}"


def test_every_rule_names_a_field_and_every_kind_is_explained():
    for cls in SETTINGS:
        names = {f.name for f in fields(cls)}
        assert set(cls.RULES) <= names, set(cls.RULES) - names
        for rule in cls.RULES.values():
            assert rule.applies is None or set(rule.applies) <= set(getattr(cls, "KINDS", {})), rule.applies


def bad_values(rule: Rule, default) -> list[float]:
    """nan, inf, -inf, and what lies just outside each bound (or at an open bound)."""
    values = [math.nan, math.inf, -math.inf]
    if rule.low is not None:
        values += [rule.low - 1, rule.low] if rule.low_open else [rule.low - 1]
    if rule.high is not None:
        values += [rule.high + 1, rule.high] if rule.high_open else [rule.high + 1]
    return [v for v in values if v != default and not rule.holds(v)]


def entry_for(cls):
    return {PruneConfig: prune.main, LoraArguments: fintune_lora.main}.get(cls, fintune_full.main)


RANGE_CASES = [(cls, f.name, v) for cls in SETTINGS for f in numbers(cls) if f.name in cls.RULES
               for v in bad_values(cls.RULES[f.name], default_of(f))]  # fmt: skip


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error")] == err[-1:], err[-3:]
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def base_argv(cls, tmp_path, model, run: list[str]) -> list[str]:
    if cls is PruneConfig:
        return ["--origin_path", str(model), "--output_dir", str(tmp_path / "out"), *CALIB, *run]
    argv = common(model, tmp_path / "out", "--max_steps", "1")
    i = argv.index("--pack_length")  # given only where a run packs (the test's own runs choose)
    return [*argv[:i], *argv[i + 2 :], *run]


@pytest.mark.parametrize(("cls", "name", "value"), RANGE_CASES,
                         ids=[f"{c.__name__}-{n}-{v}" for c, n, v in RANGE_CASES])  # fmt: skip
def test_out_of_range_numbers_are_one_line(cls, name, value, tmp_path, tiny_long_llama_dir, capsys):
    # nan/inf given to an integer flag are refused by the parser itself, also with one line naming the flag
    text = repr(value) if not math.isfinite(value) else str(int(value)) if value == int(value) else str(value)
    before = tree(tmp_path)
    argv = base_argv(cls, tmp_path, tiny_long_llama_dir, PRUNE_RUNS["structured"] if cls is PruneConfig else [])
    assert entry_for(cls)([*argv, f"--{name}", text]) == 2
    line = one_error_line(capsys)
    assert f"--{name}" in line, line
    assert tree(tmp_path) == before


def example(cls, f) -> str:
    if f.name in EXAMPLES:
        return EXAMPLES[f.name]
    rule, default = cls.RULES[f.name], default_of(f)
    for v in (rule.low + 1 if rule.low is not None else 1, 0.5, 1, 2, 3):
        if rule.holds(v) and v != default:
            return str(int(v)) if "int" in str(f.type) else str(v)
    raise AssertionError(f"no example value for {f.name}")


def run_kinds(cls, tmp_path, model, run: list[str]) -> set[str]:
    from utils.cli import parse_config, parse_dataclasses

    argv = base_argv(cls, tmp_path, model, run)
    if cls is PruneConfig:
        return parse_config(PruneConfig, argv).kinds()
    return parse_dataclasses((SFTArguments, FullTrainingArguments), argv)[0].kinds()


APPLIES_CASES = [(cls, f.name) for cls in (PruneConfig, SFTArguments) for f in own_fields(cls)
                 if f.name in cls.RULES and cls.RULES[f.name].applies]  # fmt: skip


@pytest.mark.parametrize(("cls", "name"), APPLIES_CASES, ids=[f"{c.__name__}-{n}" for c, n in APPLIES_CASES])
def test_a_flag_the_run_does_not_use_is_refused(cls, name, tmp_path, tiny_long_llama_dir, capsys):
    applies = set(cls.RULES[name].applies)
    runs = PRUNE_RUNS if cls is PruneConfig else SFT_RUNS
    run = next((r for r in runs.values() if not run_kinds(cls, tmp_path, tiny_long_llama_dir, r) & applies), None)
    assert run is not None, f"no run here that --{name} does not apply to; add one to the test's runs"
    f = next(f for f in fields(cls) if f.name == name)
    before = tree(tmp_path)
    assert entry_for(cls)([*base_argv(cls, tmp_path, tiny_long_llama_dir, run), f"--{name}", example(cls, f)]) == 2
    line = one_error_line(capsys)
    assert f"does not combine with --{name}" in line, line
    assert tree(tmp_path) == before


def test_the_runs_of_these_tests_are_what_they_claim(tmp_path, tiny_long_llama_dir):
    kinds = {k: run_kinds(PruneConfig, tmp_path, tiny_long_llama_dir, r) for k, r in PRUNE_RUNS.items()}
    assert kinds == {"structured": {"structured", "gradient", "vocab_loss"}, "magnitude": {"structured"},
                     "sparse": {"sparse"}}  # fmt: skip
    kinds = {k: run_kinds(SFTArguments, tmp_path, tiny_long_llama_dir, r) for k, r in SFT_RUNS.items()}
    assert kinds == {"instructions": {"packed", "instructions"}, "unpacked": {"instructions"}, "text": {"packed"}}


def test_a_flag_that_does_apply_is_accepted(tmp_path, tiny_long_llama_dir):
    """The same flags pass where they are used (the refusals above are about the run, not the flag)."""
    from utils.cli import parse_config

    argv = base_argv(PruneConfig, tmp_path, tiny_long_llama_dir, ["--sparsity", "0.5"])
    cfg = parse_config(PruneConfig, [*argv, "--sparsity_method", "d2prune", "--d2_r1", "2", "--sparsegpt_damp", "0.1"])
    assert cfg.d2_r1 == 2 and cfg.kinds() == {"sparse", "sparsegpt", "d2prune"}
    cfg = parse_config(PruneConfig, [*base_argv(PruneConfig, tmp_path, tiny_long_llama_dir, ["--prune_parts", "auto",
                                     "--pruning_ratio", "0.2"]), "--search_windows", "4", "--head_mode", "query"])
    assert cfg.search_windows == 4 and "heads" in cfg.kinds()


def test_validator_messages_by_hand():
    assert Rule(low=0, high=1, low_open=True, high_open=True).text() == "in (0, 1)"
    assert Rule(low=1).text() == ">= 1" and Rule(low=0, low_open=True).text() == "> 0"
    assert not Rule(low=0).holds(math.nan) and not Rule(low=0).holds(math.inf) and Rule(low=0).holds(0)
    assert not Rule(low=0, low_open=True).holds(0) and Rule(high=1, high_open=True).holds(0.99)
