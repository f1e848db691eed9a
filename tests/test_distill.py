"""Distillation from the dense model: the chunked KL and its gradient against a plain full-vocabulary
computation, zero for a teacher equal to the student, packed = per example, CE-only = the Trainer's loss,
the teacher outside the optimizer and the checkpoint, resume, plain-text rows, bad teachers."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model
from test_finetune_scripts import LAMINI, StopAt, common, losses
from transformers import AutoModelForCausalLM, TrainerCallback

import fintune_full
import fintune_lora
from dataset.packing.packed_dataset import pack_examples, pack_text
from module.train.distill import Distiller, shifted_targets
from utils.report import versions

GEN = torch.Generator().manual_seed(5)


def batch(n=2, t=11):
    ids = torch.randint(0, VOCAB, (n, t), generator=GEN)
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt
    return ids, labels


def reference(student, teacher, ids, labels, alpha, temperature):
    """Full-vocabulary logits of both models, one autograd graph: (alpha KL + (1-alpha) CE) sums."""
    z_s = student(ids).logits[:, :-1].reshape(-1, VOCAB)
    with torch.no_grad():
        z_t = teacher(ids).logits[:, :-1].reshape(-1, VOCAB)
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    kl = F.kl_div(torch.log_softmax(z_s[keep] / temperature, -1), torch.log_softmax(z_t[keep] / temperature, -1),
                  log_target=True, reduction="sum") * temperature**2  # fmt: skip
    ce = F.cross_entropy(z_s, y, ignore_index=-100, reduction="sum")
    return alpha * kl + (1 - alpha) * ce


def student_loss(student, distiller, ids, labels, num_items=1, **inputs):
    out = student(input_ids=ids, **inputs)
    return distiller.loss(out.logits, {"input_ids": ids, **inputs}, labels, num_items)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_loss_and_gradient_equal_the_full_vocabulary_computation(temperature):
    student, teacher = tiny_model("llama", seed=0).train(), tiny_model("llama", seed=1)
    ids, labels = batch()
    distiller = Distiller(teacher, alpha=0.7, temperature=temperature, chunk_tokens=4)  # several chunks
    loss = student_loss(student, distiller, ids, labels)
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    expected = reference(student, teacher, ids, labels, 0.7, temperature)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 1
    for got, want in zip(grads, (p.grad for p in student.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_equal_to_the_student_gives_zero_kl_and_zero_gradient():
    student = tiny_model("qwen2", seed=3).train()
    distiller = Distiller(tiny_model("qwen2", seed=3), alpha=1.0, temperature=2.0, chunk_tokens=5)
    ids, labels = batch()
    loss = student_loss(student, distiller, ids, labels)
    loss.backward()
    # zero up to float noise (the two sides reach the logits through different matmul shapes); an unrelated
    # teacher of the same family gives a KL of ~1 here
    assert abs(loss.item()) < 1e-5
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-5


def test_ce_only_equals_the_models_own_loss():
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids, labels = batch()
    n = int((labels[:, 1:] != -100).sum()) + 7  # the effective batch's count, as the Trainer passes it
    got = student_loss(student, Distiller(teacher, alpha=0.0, temperature=1.0), ids, labels, n)
    want = student(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_packed_rows_give_the_per_example_sums():
    student, teacher = tiny_model("mistral", seed=0), tiny_model("mistral", seed=2)
    student.config.use_cache = False  # as in training: with a cache transformers does not look for packed rows
    distiller = Distiller(teacher, alpha=0.5, temperature=1.5, chunk_tokens=6)
    examples = []
    for n in (7, 5, 9):
        ids = torch.randint(0, VOCAB, (n,), generator=GEN).tolist()
        examples.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    (row,), _ = pack_examples(examples, 21, "consecutive")
    with torch.no_grad():
        packed = student_loss(student, distiller, torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]]),
                              position_ids=torch.tensor([row["position_ids"]]))  # fmt: skip
        alone = sum(student_loss(student, distiller, torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]]))
                    for e in examples)  # fmt: skip
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)


def test_pack_text_by_hand():
    rows = pack_text([[1, 2, 3], [4, 5], [6, 7, 8, 9]], row_length=4, eos_id=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> three full rows, nothing left over
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert all(r["labels"] == r["input_ids"] and r["position_ids"] == [0, 1, 2, 3] for r in rows)
    assert pack_text([[1, 2, 3]], row_length=5, eos_id=None) == []


def test_shifted_targets():
    assert shifted_targets(torch.tensor([[5, 6, 7], [-100, 8, 9]])).tolist() == [6, 7, -100, 8, 9, -100]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_long_llama_dir):
    """Another tiny Llama with the same tokenizer: a student that differs from the teacher."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("students") / "student"
    model = AutoModelForCausalLM.from_pretrained(tiny_long_llama_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_long_llama_dir).save_pretrained(path)
    return path


def test_teacher_is_frozen_outside_the_optimizer_and_not_saved(student_dir, tiny_long_llama_dir, tmp_path):
    from cfg.finetune_config import FullTrainingArguments, SFTArguments
    from module.train.sft import build

    sft = SFTArguments(model=str(student_dir), dataset_name=LAMINI, tokenizer_max=256, max_train_samples=16,
                       data_cache="", distill_from=str(tiny_long_llama_dir), distill_alpha=0.5)  # fmt: skip
    args = FullTrainingArguments(output_dir=str(tmp_path / "o"), max_steps=2, gradient_accumulation_steps=1,
                                 gradient_checkpointing=False, report_to=[], disable_tqdm=True)  # fmt: skip
    trainer, _, _ = build(sft, args, None)
    teacher = trainer.distiller.teacher
    before = [p.clone() for p in teacher.parameters()]
    trainer.train()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert optimized == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    trainer.save_model(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(trainer.model.state_dict()) - {"lm_head.weight"}  # tied to the embeddings
    assert any(k in log for log in trainer.state.log_history for k in ("distill_kl",))


def test_distilled_resume_reproduces_the_uninterrupted_losses(student_dir, tiny_long_llama_dir, tmp_path):
    extra = ["--max_steps", "4", "--save_steps", "2", "--gradient_accumulation_steps", "2", "--distill_from",
             str(tiny_long_llama_dir), "--distill_alpha", "0.5", "--distill_temperature", "2"]  # fmt: skip
    assert fintune_full.main(common(student_dir, tmp_path / "full", *extra)) == 0
    assert fintune_full.main(common(student_dir, tmp_path / "cut", *extra), callbacks=[StopAt(2)]) == 0
    resumed = common(student_dir, tmp_path / "cut", *extra, "--resume_from_checkpoint", "last")
    assert fintune_full.main(resumed) == 0
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    for step in (3, 4):
        assert cut[step] == pytest.approx(full[step], rel=1e-5)
    history = json.loads((tmp_path / "full" / "train_report.json").read_text())["log_history"]
    assert all("distill_kl" in h and "distill_ce" in h for h in history if "loss" in h)


def test_lora_distills_on_plain_text(student_dir, tiny_long_llama_dir, tmp_path):
    text = tmp_path / "c4.jsonl"
    text.write_text("".join(json.dumps({"content": f"document {i}: " + "some words here " * 20}) + "\n"
                            for i in range(20)))  # fmt: skip
    argv = common(student_dir, tmp_path / "lora", "--max_steps", "2", "--gradient_accumulation_steps", "1",
                  "--distill_from", str(tiny_long_llama_dir), "--text_field", "content", "--pack_length", "64",
                  "--tokenizer_max", "64")  # fmt: skip
    argv[argv.index(LAMINI)] = str(text)
    assert fintune_lora.main(argv) == 0
    report = json.loads((tmp_path / "lora" / "train_report.json").read_text())
    assert report["data"]["text"] and report["data"]["fill_ratio"] == 1.0 and report["data"]["rows"] >= 2
    assert not any("teacher" in p.name for p in (tmp_path / "lora").rglob("*"))


def test_bad_teachers_are_one_line(student_dir, tiny_long_llama_dir, tmp_path, capsys):
    other_vocab = tmp_path / "other-vocab"
    model = AutoModelForCausalLM.from_pretrained(tiny_long_llama_dir)
    model.resize_token_embeddings(VOCAB + 8)
    model.save_pretrained(other_vocab)
    other_tok = tmp_path / "other-tokenizer"
    AutoModelForCausalLM.from_pretrained(tiny_long_llama_dir).save_pretrained(other_tok)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_long_llama_dir)
    tok.save_pretrained(other_tok)
    spec = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two token ids swapped
    (other_tok / "tokenizer.json").write_text(json.dumps(spec))
    cases = [(other_vocab, "has a vocabulary of 308 tokens, the student 300"),
             (other_tok, "uses another tokenizer"), (tmp_path / "missing", "no such folder")]  # fmt: skip
    for i, (teacher, message) in enumerate(cases):
        out = tmp_path / f"o{i}"
        argv = common(student_dir, out, "--max_steps", "1", "--distill_from", str(teacher))
        assert fintune_full.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err[-3:]
        assert not out.exists()
    assert fintune_full.main(common(student_dir, tmp_path / "o9", "--distill_alpha", "1.5")) == 2
    assert "--distill_alpha must be in [0, 1]" in capsys.readouterr().err


def test_recovery_study_runs_and_resumes_on_a_tiny_model(tmp_path, tiny_long_llama_dir):
    from bench.studies import recovery

    out = tmp_path / "RECOVERY.md"
    argv = ["--model", str(tiny_long_llama_dir), "--train_tokens", "512", "--pack_length", "128",
            "--gradient_accumulation_steps", "2", "--limit", "2", "--tasks", "arc_easy_local,boolq_local",
            "--ppl_windows", "1", "--ppl_seq_len", "64", "--calib_samples", "4", "--seq_len", "32", "--out", str(out),
            "--work_dir", str(tmp_path / "work"), "--lr_full", "1e-3"]  # fmt: skip
    assert recovery.main([*argv, "--arms", "full:ce"]) == 0
    assert "Not measured yet" not in out.read_text()
    assert recovery.main([*argv, "--arms", "full:ce,lora:distill,full:ce@1", "--resume"]) == 0
    rows = json.loads(out.with_name("recovery.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["dense", "pruned", "full:ce", "lora:distill", "full:ce@1"]
    assert rows[2]["train_tokens"] == rows[3]["train_tokens"] == 512 and rows[3]["curve"][0][2] is not None
    assert rows[3]["params"] == rows[2]["params"] == rows[1]["params"] < rows[0]["params"]
    # another training seed: the same pruned model, other rows in another order, so another first loss
    assert rows[4]["train_tokens"] == 512 and rows[4]["curve"][0][1] != rows[2]["curve"][0][1]
    assert any(p.name == "full-ce-s1" for p in (tmp_path / "work").glob("*/*"))
    text = out.read_text()
    assert "| full:ce |" in text and "| lora:distill |" in text and "| full:ce@1 |" in text
    assert "training seed 0 (the arms named @SEED repeat one with training seed 1)" in text
    assert out.with_name("recovery.png").exists()
    # an interrupted study's state: the report of what is measured, nothing trained
    assert recovery.main([*argv, "--arms", "full:ce,full:both", "--measured_only"]) == 0
    assert (
        "| full:ce |" in out.read_text()
        and "Not measured yet (run again with `--resume`): full:both." in out.read_text()
    )
    assert not any(p.name == "full-both" for p in (tmp_path / "work").glob("*/*"))
    # a fresh checkout: no WORK folder, but the committed recovery.json holds the rows of these settings
    fresh = [*argv, "--work_dir", str(tmp_path / "fresh")]
    assert recovery.main([*fresh, "--arms", "full:ce,lora:distill", "--measured_only"]) == 0
    assert [r["name"] for r in json.loads(out.with_name("recovery.json").read_text())["rows"]] == [
        "dense", "pruned", "full:ce", "lora:distill", "full:ce@1"]  # fmt: skip
    # ... and only those: other settings (another seed) find nothing to reuse
    assert recovery.main([*fresh, "--seed", "1", "--measured_only"]) == 2
    # the same arm from a reconstructed model: its own rows and files beside its own --out, the same kept widths
    refit = tmp_path / "RECOVERY_LS.md"
    argv[argv.index("--out") + 1] = str(refit)
    assert recovery.main([*argv, "--arms", "full:ce", "--reconstruct", "ls", "--reconstruct_samples", "8"]) == 0
    refit_rows = {r["name"]: r for r in json.loads(refit.with_name("recovery_ls.json").read_text())["rows"]}
    assert refit_rows["pruned"]["params"] == rows[1]["params"] and refit_rows["pruned"]["ppl"] != rows[1]["ppl"]
    assert refit_rows["dense"]["ppl"] == rows[0]["ppl"] and refit.with_name("recovery_ls.png").exists()
    assert "`--reconstruct ls` on 8 windows" in refit.read_text()
    untouched = json.loads(out.with_name("recovery.json").read_text())["rows"]
    assert [r["name"] for r in untouched][:2] == ["dense", "pruned"] and untouched[1]["ppl"] == rows[1]["ppl"]


class StepsRun(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(state.global_step)


def test_recovery_arm_cut_off_resumes_from_its_checkpoint(tmp_path, tiny_long_llama_dir, monkeypatch):
    """A study arm stopped after its first checkpoint (a session's end) continues from it and ends with the
    weights of an uninterrupted arm."""
    import module.train.sft
    from bench.studies import recovery

    cfg = recovery.RecoveryConfig(
        model=str(tiny_long_llama_dir),
        train_tokens=1024,
        pack_length=128,
        gradient_accumulation_steps=2,
        save_steps=2,
        lr_full=1e-3,
        work_dir=str(tmp_path),
    )
    assert cfg.steps == 4
    pruned = tiny_long_llama_dir  # the arm's code path does not care whether the model was pruned
    whole, whole_info = recovery.train_arm(cfg, pruned, recovery.Arm("full", "distill"), tmp_path / "whole")
    run_sft = module.train.sft.run_sft
    monkeypatch.setattr(module.train.sft, "run_sft", lambda sft, lora, args: run_sft(sft, lora, args, [StopAt(2)]))
    recovery.train_arm(cfg, pruned, recovery.Arm("full", "distill"), tmp_path / "cut")
    assert max(losses(tmp_path / "cut")) == 2 and (tmp_path / "cut" / "checkpoint-2" / "trainer_state.json").is_file()
    steps_run = StepsRun()
    monkeypatch.setattr(module.train.sft, "run_sft", lambda sft, lora, args: run_sft(sft, lora, args, [steps_run]))
    resumed, info = recovery.train_arm(cfg, pruned, recovery.Arm("full", "distill"), tmp_path / "cut")
    assert steps_run.steps == [3, 4]  # continued, not started over
    assert [step for step, *_ in info["curve"]] == [1, 2, 3, 4]
    assert info["resumed"] and not whole_info["resumed"]  # the report marks the resumed arm's minutes
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_recovered_share_by_hand_and_not_for_a_gap_within_noise():
    from bench.studies import recovery

    dense = {"name": "dense", "params": 10, "ppl": 10.0, "avg": 55.0, "tasks": {"arc": 52.0, "boolq": 58.0},
             "eval_seconds": 1}  # fmt: skip
    pruned = {"name": "pruned", "params": 8, "ppl": 40.0, "avg": 55.0, "tasks": {"arc": 40.0, "boolq": 70.0},
              "eval_seconds": 1}  # fmt: skip
    arm = {"name": "full:ce", "params": 8, "ppl": 20.0, "avg": 58.0, "tasks": {"arc": 46.0, "boolq": 70.0},
           "train_seconds": 60, "eval_seconds": 1}  # fmt: skip
    # perplexity on a log scale: ln(40/20) / ln(40/10) = 1/2
    assert recovery.recovered(arm, dense, pruned, "ppl") == pytest.approx(0.5)
    # the average over both tasks has no gap (55 vs 55): no share; without BoolQ the gap is 12 points, 6 won back
    assert recovery.recovered(arm, dense, pruned, "avg") is None
    assert recovery.recovered(arm, dense, pruned, "avg_ex_boolq") == pytest.approx(0.5)
    assert recovery.recovered(arm, dense, pruned, "avg_ex_boolq", noise=12.0) is None
    cfg = recovery.RecoveryConfig(limit=200, arms="full:ce")
    # two tasks of 200 items: a difference of two averages has a standard error of 100 * sqrt(0.5 / 400) = 3.54
    assert recovery.average_se(cfg, 2) == pytest.approx(3.5355, abs=1e-4)
    text = recovery.report([dense, pruned, arm], {"versions": versions(), "boolq_yes_share": 60.0}, cfg)
    row = next(line for line in text.splitlines() if line.startswith("| full:ce |"))
    # ppl share 50%; avg 58.00 with no share; avg ex. BoolQ 46.00: one task's 12-point gap is above its noise
    # (2 x 100 * sqrt(0.5 / 200) = 10 points): 50%
    assert "| 20.00 | 50% |" in row and "| 58.00 | – | 46.00 | 50% | 1 |" in row
    assert "avg ex. BoolQ +12.00 points (two standard errors: 10.0)" in text
    assert "One training seed" not in text  # no distillation arm: no verdict
    # the verdict weighs distill - ce (ppl 20.0 vs 19.0: 1.00) against the seeds' spread: ce 20.0 / 20.4 / 19.7,
    # distill 19.0 / 19.5, so 0.70 (ce's, 20.4 - 19.7) is the largest; with ce@1 at 21.5 it is 1.80 (21.5 - 19.7),
    # larger than the difference
    distill = {**arm, "name": "full:distill", "ppl": 19.0}
    seeds = [{**arm, "name": "full:ce@1", "ppl": 20.4}, {**arm, "name": "full:ce@2", "ppl": 19.7},
             {**distill, "name": "full:distill@1", "ppl": 19.5}]  # fmt: skip
    lines = recovery.verdict({r["name"]: r for r in [dense, pruned, arm, distill]}, cfg)
    assert len(lines) == 1 and "lower by 1.00" in lines[0] and "One training seed" in lines[0]
    lines = recovery.verdict({r["name"]: r for r in [dense, pruned, arm, distill, *seeds]}, cfg)
    assert "Another training seed moves full:ce's perplexity by 0.70: the difference is larger than that." in lines[0]
    # means: ce (20.0 + 20.4 + 19.7) / 3 = 20.033, distill (19.0 + 19.5) / 2 = 19.25
    assert "Mean over the seeds (2 and 3 runs): 19.25 vs 20.03 (lower by 0.78)." in lines[0]
    seeds[0]["ppl"] = 21.5
    lines = recovery.verdict({r["name"]: r for r in [dense, pruned, arm, distill, *seeds]}, cfg)
    assert "moves full:ce's perplexity by 1.80: the difference is not larger than that." in lines[0]
    with pytest.raises(ValueError, match="MODE:OBJECTIVE\\[@SEED\\]"):
        recovery.RecoveryConfig(arms="full:ce@x")
    assert recovery.RecoveryConfig(arms="full:ce@0,lora:both@3").arm_list == [
        recovery.Arm("full", "ce"), recovery.Arm("lora", "both", 3)]  # fmt: skip


def test_throughput_bench_steps_train_the_student_and_time_every_phase():
    """bench/speed/train_throughput.py's step (timed by the CPU bench and the GPU check): the student's weights move,
    the teacher's do not, and the phase timer reports each phase of both variants."""
    from bench.speed.train_throughput import SHAPES, TrainStep, distill_step_speed, step_phases, student_teacher
    from dataset.packing.packed_dataset import Collator

    cpu = torch.device("cpu")
    student, teacher = student_teacher({**SHAPES["small"], "num_hidden_layers": 1}, 64, cpu, torch.float32)
    rows = [{"input_ids": list(range(1, 30)), "labels": list(range(1, 30))},
            {"input_ids": list(range(2, 20)), "labels": [-100] * 5 + list(range(7, 20))}]  # fmt: skip
    batches = [Collator(0)(rows), Collator(0)(rows[1:])]
    before = [p.detach().clone() for p in (*student.parameters(), *teacher.parameters())]
    TrainStep(student, teacher, cpu)(batches[0])
    n = len(list(student.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before[:n], student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before[n:], teacher.parameters()))
    distilled = step_phases(student, teacher, batches, cpu)
    assert set(distilled) == {"student forward", "teacher forward + loss", "backward", "optimizer step",
                              "teacher forward alone", "loss alone"}  # fmt: skip
    assert min(v for k, v in distilled.items() if k != "loss alone") > 0
    plain = step_phases(student, None, batches, cpu)
    assert set(plain) == {"student forward + CE", "backward", "optimizer step"} and min(plain.values()) > 0
    assert distill_step_speed(student, teacher, batches, cpu)["tokens_per_s"] > 0
