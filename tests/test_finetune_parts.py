"""Fine-tuning building blocks: prompts and masking, packing, packed attention, AnyPrecisionAdamW."""

import copy
import math

import pytest
import torch
from conftest import tiny_model

from bench.speed.gpu_check import packing_agreement
from dataset.LaMini_dataset import Example, to_examples, tokenize_example
from dataset.packing.packed_dataset import Collator, pack_best_fit_decreasing, pack_consecutive, pack_examples
from dataset.prompter import Prompter
from module.train.optim import AnyPrecisionAdamW, state_bytes
from module.train.sft import row_multiple
from utils.errors import UserError


def test_packers_on_hand_computed_lengths():
    lengths = [5, 3, 4, 2, 6]
    # in order: 5+3 | 4+2 | 6
    assert pack_consecutive(lengths, 8) == [[0, 1], [2, 3], [4]]
    # longest first into the tightest room: 6 (room 2), 5 (room 3), 4 (room 4), 3 -> room 3, 2 -> room 2
    assert pack_best_fit_decreasing(lengths, 8) == [[4, 3], [0, 1], [2]]


def test_pack_examples_labels_and_positions():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]},
    ]
    rows, fill = pack_examples(examples, 6, "consecutive")
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9], "position_ids": [0, 1, 2, 3]},
    ]
    assert fill == pytest.approx(9 / 12)
    batch = Collator(pad_token_id=0)(rows)
    assert batch["input_ids"][1].tolist() == [6, 7, 8, 9, 0]
    assert batch["labels"][1].tolist() == [-100, 7, 8, 9, -100]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0]
    assert "attention_mask" not in batch
    padded = Collator(pad_token_id=0, packed=False)(rows)
    assert padded["attention_mask"][1].tolist() == [1, 1, 1, 1, 0] and "position_ids" not in padded
    assert padded["labels"][1].tolist() == [-100, 7, 8, 9, -100]
    with pytest.raises(ValueError, match="more than the pack length"):
        pack_examples(examples, 3, "bfd")
    # rounded up to a multiple of 4: widths 5 -> 8, the padding a sequence of its own (positions 0, 1, ...)
    wide = Collator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert wide["input_ids"][1].tolist() == [6, 7, 8, 9, 0, 0, 0, 0]
    assert wide["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert wide["labels"][0].tolist() == [-100, 2, 3, -100, 5, -100, -100, -100]
    assert Collator(pad_token_id=0, packed=False, pad_to_multiple_of=4)(rows)["attention_mask"][0].tolist() == [
        1, 1, 1, 1, 1, 0, 0, 0]  # fmt: skip
    assert row_multiple("flex_attention") == 128 and row_multiple("sdpa") == row_multiple("eager") == 1


def test_prompt_masking_and_eos(tiny_tokenizer):
    prompter = Prompter()
    ex = Example("Name a colour", "", "Blue")
    row = tokenize_example(tiny_tokenizer, prompter, ex, 512, train_on_inputs=False)
    prompt_ids = tiny_tokenizer(prompter.prompt("Name a colour"))["input_ids"]
    answer_ids = tiny_tokenizer("Blue", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt_ids + answer_ids + [tiny_tokenizer.eos_token_id]
    assert row["labels"] == [-100] * len(prompt_ids) + answer_ids + [tiny_tokenizer.eos_token_id]
    with_inputs = tokenize_example(tiny_tokenizer, prompter, ex, 512, train_on_inputs=True)
    assert with_inputs["labels"] == with_inputs["input_ids"]
    short = tokenize_example(tiny_tokenizer, prompter, ex, len(prompt_ids) + 1, train_on_inputs=False)
    assert short["input_ids"] == prompt_ids + answer_ids[:1] and short["labels"][-1] == answer_ids[0]
    assert "### Input:\nred or blue" in prompter.prompt("Pick", "red or blue")
    assert "### Input:" not in prompter.prompt("Pick")


def test_field_mapping():
    assert to_examples([{"instruction": "i", "response": "r"}]) == [Example("i", "", "r")]
    assert to_examples([{"instruction": "i", "input": "x", "output": "o"}]) == [Example("i", "x", "o")]
    with pytest.raises(UserError, match="unknown dataset fields"):
        to_examples([{"question": "q", "answer": "a"}])


@pytest.mark.parametrize(("attn", "multiple"), [("sdpa", 1), ("eager", 1), ("sdpa", 16)])
def test_packed_loss_equals_per_example_loss_and_examples_stay_apart(attn, multiple):
    """multiple 16: every sequence padded at its end to 16 tokens (as for flex_attention's blocks)."""
    model = tiny_model("llama")
    model.set_attn_implementation(attn)
    model.config.use_cache = False  # with a cache, transformers does not look for packed sequences
    gen = torch.Generator().manual_seed(0)
    examples = []
    for n in (7, 5, 9):
        ids = torch.randint(0, 300, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    r = packing_agreement(model, examples, 32, multiple)
    assert r["packed_loss"] == pytest.approx(r["per_example_loss"], rel=1e-4)
    # changing the first example must not change any logit of the second one ...
    assert r["max_logit_change_isolated"] <= 1e-5
    # ... which it does when the row is read as one sequence (no position_ids): the check can fail
    assert r["max_logit_change_without_position_ids"] > 1e-2


def test_packing_agreement_per_example_loss_by_hand():
    """The per-example reference of `packing_agreement` on a model whose logits are known: uniform."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each token's loss is log(vocab)
    model.config.use_cache = False
    examples = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}, {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]
    r = packing_agreement(model, examples, 16)
    assert r["per_example_loss"] == pytest.approx(math.log(300), rel=1e-6)
    assert r["packed_loss"] == pytest.approx(math.log(300), rel=1e-6)


def regression_run(make_opt, dtype=torch.float32, steps=50, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 1)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(dtype)
    opt = make_opt(net.parameters())
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(x.to(dtype)).float() - y) ** 2).mean()
        loss.backward()
        opt.step()
    return net, loss.item(), opt


def test_anyprecision_fp32_equals_torch_adamw_for_50_steps():
    ref, _, _ = regression_run(lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05))
    ours, _, _ = regression_run(lambda p: AnyPrecisionAdamW(p, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05))
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_states_halve_memory_and_kahan_tracks_fp32():
    _, _, fp32_opt = regression_run(lambda p: AnyPrecisionAdamW(p, lr=1e-3), steps=1)
    _, _, bf16_opt = regression_run(
        lambda p: AnyPrecisionAdamW(p, lr=1e-3, momentum_dtype="bfloat16", variance_dtype="bfloat16"), steps=1
    )
    assert state_bytes(bf16_opt) * 2 == state_bytes(fp32_opt)
    _, reference, _ = regression_run(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0), steps=300)
    bf16 = dict(lr=1e-3, momentum_dtype="bfloat16", variance_dtype="bfloat16")
    _, kahan, _ = regression_run(lambda p: AnyPrecisionAdamW(p, **bf16, use_kahan_summation=True), torch.bfloat16, 300)
    _, plain, _ = regression_run(lambda p: AnyPrecisionAdamW(p, **bf16), torch.bfloat16, 300)
    assert abs(kahan - reference) < 0.1 * reference  # pure-bf16 weights with Kahan stay near fp32 training
    assert plain - reference > 2 * abs(kahan - reference)  # without it, small updates are lost to rounding


def paired_steps(dtype, steps=10, **settings):
    """The same 10 steps through the foreach reference and the per-tensor fused step (eager), lr changing."""
    nets = []
    for fused in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(dtype)
        opt = AnyPrecisionAdamW(net.parameters(), fused=fused, compile=False, **settings)
        x, y = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), torch.randn(64, 1)
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = settings["lr"] * (1 - i / steps)  # a schedule
            opt.zero_grad()
            ((net(x.to(dtype)).float() - y) ** 2).mean().backward()
            opt.step()
        nets.append((net, opt))
    return nets


def effective(net, opt):
    """Each weight as fp32 plus its Kahan carry (what the bf16 weight stands for)."""
    out = []
    for p in net.parameters():
        comp = opt.state[p].get("compensation")
        out.append(p.float() + (comp.float() if comp is not None else 0))
    return out


def test_fused_step_equals_the_foreach_reference_over_10_steps():
    (ref, ref_opt), (fused, fused_opt) = paired_steps(torch.float32, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    for a, b in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    bf16 = dict(lr=1e-3, momentum_dtype="bfloat16", variance_dtype="bfloat16", use_kahan_summation=True)
    (ref, ref_opt), (fused, fused_opt) = paired_steps(torch.bfloat16, **bf16)
    for a, b in zip(effective(ref, ref_opt), effective(fused, fused_opt)):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)
    for p_ref, p_fused in zip(ref.parameters(), fused.parameters()):
        assert fused_opt.state[p_fused]["exp_avg"].dtype == torch.bfloat16
        assert not torch.equal(p_ref, torch.zeros_like(p_ref))


def test_fused_state_resumes_in_either_implementation():
    (_, _), (net, opt) = paired_steps(torch.float32, steps=4, lr=1e-2)
    saved = copy.deepcopy(opt.state_dict())
    again = copy.deepcopy(net)
    resumed = AnyPrecisionAdamW(again.parameters(), lr=1e-2, fused=False)
    resumed.load_state_dict(saved)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    for model, o in ((net, opt), (again, resumed)):
        o.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        o.step()
    for a, b in zip(net.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_step_equals_the_eager_one_without_recompiling_for_the_schedule():
    from torch._dynamo.utils import counters

    settings = dict(lr=1e-3, momentum_dtype="bfloat16", variance_dtype="bfloat16", use_kahan_summation=True)
    nets = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Linear(16, 8).to(torch.bfloat16)
        opt = AnyPrecisionAdamW(net.parameters(), fused=True, compile=compile_it, **settings)
        for i in range(3):
            opt.param_groups[0]["lr"] = 1e-3 * (i + 1)
            opt.zero_grad()
            net(torch.ones(4, 16, dtype=torch.bfloat16)).float().pow(2).mean().backward()
            if compile_it and i == 1:
                frames = counters["stats"]["unique_graphs"]
            opt.step()
        nets.append((net, opt))
    assert counters["stats"]["unique_graphs"] == frames  # the third lr compiled nothing new
    for a, b in zip(effective(*nets[0]), effective(*nets[1])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_mfu_counts_6n_for_trained_weights_and_4n_for_frozen_ones(monkeypatch):
    from types import SimpleNamespace

    import module.train.trainer as trainer_module
    from utils.report import train_flops_per_token

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))  # 15 + 8 parameters
    model[1].requires_grad_(False)
    assert train_flops_per_token(model) == 4 * 23 + 2 * 15
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device: 1e6)
    fake = SimpleNamespace(args=SimpleNamespace(device="cuda", world_size=2), model=model, _flops_per_token=None)
    assert trainer_module.PackedSFTTrainer.mfu(fake, 1000.0) == pytest.approx(1000 * 122 / 2e6)
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device: None)
    assert trainer_module.PackedSFTTrainer.mfu(fake, 1000.0) is None
