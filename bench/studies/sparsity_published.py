"""The published Wanda and SparseGPT code on the same model and calibration windows as bench/studies/sparsity.py.

The published code (locuslab/wanda, IST-DASLab/sparsegpt) calls decoder layers the way transformers 4.3x
did, so it runs in a second environment through bench/studies/published_driver.py; the windows are drawn here by
the same code and settings as prune.py's, and each pruned model is scored here like bench/studies/sparsity.py's rows
(WikiText-2 perplexity on the same windows). bench/studies/sparsity.py then sets our rows beside these.

    python -m venv --system-site-packages /tmp/refenv
    /tmp/refenv/bin/pip install transformers==4.36.2 datasets==2.16.1 loguru toml
    git clone https://github.com/locuslab/wanda /tmp/peer/wanda
    git clone https://github.com/IST-DASLab/sparsegpt /tmp/peer/sparsegpt
    git clone https://github.com/20250516aaa/D2Prune /tmp/peer/D2Prune && git -C /tmp/peer/D2Prune checkout b22c860
    python bench/studies/sparsity_published.py --python /tmp/refenv/bin/python --wanda_repo /tmp/peer/wanda \\
        --sparsegpt_repo /tmp/peer/sparsegpt --resume      # -> docs/sparsity_published.json (~1 h on 2 CPU cores)
    python bench/studies/sparsity_published.py --python /tmp/refenv/bin/python --d2prune_repo /tmp/peer/D2Prune \\
        --methods d2prune --patterns unstructured --seeds 0 --variants eager --calib_samples 32 --seq_len 2048 \\
        --out docs/d2prune_published_2048.json --resume   # D2Prune at 2048-token windows (and 128 x 512)
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import Evaluation, Rows, model_or_default, reference_main
from bench.studies.sparsity import VARIANT, SparsityStudyConfig
from dataset.calibration import load_documents, sample_windows
from module.model.mlp import count_parameters, decoder_layers
from module.sparse.layerwise import linears_of
from module.sparse.masks import Pattern
from module.sparse.pipeline import prune_weights, sparsity_of
from utils.cli import load_causal_lm, load_tokenizer
from utils.errors import UserError
from utils.report import versions

DRIVER = ROOT / "bench" / "studies" / "published_driver.py"


@dataclass
class PublishedConfig(SparsityStudyConfig):
    out: str = field(default="docs/sparsity_published.json", metadata={"help": "The published code's rows."})
    work_dir: str = field(default="out/sparsity_published", metadata={"help": "Rows so far, windows, models."})
    methods: str = field(default="wanda,sparsegpt", metadata={"help": "Published implementations to run."})
    seeds: str = field(default="0", metadata={"help": "Calibration seeds (bench/studies/sparsity.py's windows)."})
    python: str = field(default="", metadata={"help": "Interpreter of the environment the published code runs in."})
    wanda_repo: str = field(default="", metadata={"help": "A git checkout of locuslab/wanda."})
    sparsegpt_repo: str = field(default="", metadata={"help": "A git checkout of IST-DASLab/sparsegpt."})
    d2prune_repo: str = field(default="", metadata={"help": "A git checkout of 20250516aaa/D2Prune."})
    variants: str = field(
        default="eager,batch4,jitter1@2:4",
        metadata={"help": "Our pruning again on the same windows, changed only at the level of rounding: eager (the "
                          "attention the published code runs), batchN (calibration batches of N windows instead of "
                          "1), jitterS (the embeddings times 1 + 1e-6 N(0, 1), seed S, while pruning); VARIANT@PATTERN "
                          "runs it for that pattern only."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        self.variant_list = [tuple(v.strip().partition("@")[::2]) for v in self.variants.split(",") if v.strip()]
        for variant, _ in self.variant_list:
            variant_settings(variant)
        unknown = set(self.method_list) - {"wanda", "sparsegpt", "d2prune"}
        if unknown:
            raise UserError(f"--methods: published implementations are wanda, sparsegpt and d2prune, not "
                            f"{sorted(unknown)}")  # fmt: skip
        for method in self.method_list:
            if not (Path(self.repo(method)) / ".git").exists():
                raise UserError(f"--{method}_repo {self.repo(method)!r} is not a git checkout of the published code")
        if not Path(self.python).is_file():
            raise UserError(f"--python {self.python!r}: no such interpreter")

    def repo(self, method: str) -> str:
        return {"wanda": self.wanda_repo, "sparsegpt": self.sparsegpt_repo, "d2prune": self.d2prune_repo}[method]

    def settings(self) -> dict:
        """As the study's, without the variants (they only select rows)."""
        return {k: v for k, v in super().settings().items() if k != "variants"}


def variant_settings(variant: str) -> tuple[str, int, int | None]:
    """The attention implementation, calibration batch size and embedding jitter seed of a --variants entry."""
    if variant == "eager":
        return "eager", 1, None
    for prefix in ("batch", "jitter"):
        if variant.startswith(prefix) and variant[len(prefix) :].isdigit():
            number = int(variant[len(prefix) :])
            if prefix == "jitter":
                return "sdpa", 1, number
            if number > 0:
                return "sdpa", number, None
    raise UserError(f"--variants: {variant!r} is not eager, batchN (N > 0) or jitterS (S a seed)")


def git_commit(repo: str) -> str:
    res = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    return res.stdout.strip()


def reference_versions(python: str) -> dict:
    code = "import json, torch, transformers; print(json.dumps([torch.__version__, transformers.__version__]))"
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    torch_version, transformers_version = json.loads(res.stdout.strip().splitlines()[-1])
    return {"torch": torch_version, "transformers": transformers_version}


def prune_variant(model_path: str, windows: torch.Tensor, method: str, pattern: str, sparsity: float,
                  variant: str) -> tuple[torch.nn.Module, float]:  # fmt: skip
    """Our pruning (prune.py --sparsity's prune_weights, its defaults) under a --variants entry, the model then
    switched to SDPA for scoring like every other row."""
    attention, batch_size, jitter = variant_settings(variant)
    model = load_causal_lm(model_path, "--model", torch.float32, attn_implementation=attention)
    embeddings = model.get_input_embeddings().weight
    exact = None
    if jitter is not None:  # about 8 float32 ulps: the size of the rounding differences between two codes
        exact = embeddings.detach().clone()
        noise = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(jitter))
        embeddings.data.mul_(1 + 1e-6 * noise.to(embeddings.device))
    start = time.perf_counter()
    prune_weights(model, windows, method, Pattern.parse(pattern, sparsity), batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    if exact is not None:  # the embeddings are not pruned: every variant is scored with the exact ones
        embeddings.data.copy_(exact)
    model.set_attn_implementation("sdpa")
    return model, seconds


def layer0_masks(model) -> dict[str, torch.Tensor]:
    """The zeroed weights of every linear of decoder layer 0, by name."""
    layer = decoder_layers(model)[0]
    return {name: lin.weight.detach() == 0 for name, lin in linears_of(layer).items()}


def mask_differences(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per linear of layer 0: how many positions' removed/kept state differs (and their share), and how many more
    weights the published code keeps than ours (negative: removes; the released D2Prune's block threshold
    `tmp <= thresh` at sorted index int(n * sparsity) removes one more weight per 128-column block)."""
    out = {}
    for name, mine in ours.items():
        differ = mine != theirs[name]
        out[name] = {"differ": float(differ.float().mean()), "differ_positions": int(differ.sum()),
                     "published_keeps_more": int(mine.sum() - theirs[name].sum())}  # fmt: skip
    return out


def measure(cfg: PublishedConfig) -> dict:
    cfg.model = model_or_default(cfg.model)
    rows = Rows(cfg)
    tokenizer = load_tokenizer(cfg.model, "--model")
    evaluation = Evaluation(cfg, tokenizer, "cpu")

    def scored(model) -> dict:
        """What every row records of a pruned model: its size, achieved sparsity and evaluation."""
        return {"params": count_parameters(model), "achieved": sparsity_of(model)["pruned_linears"],
                **evaluation(model)}  # fmt: skip

    docs = load_documents(str(Path(cfg.data_dir) / cfg.calib_file))

    def masks_file(name: str) -> Path:
        """Layer 0's removed weights of a published model, kept beside its row so a resumed run compares too."""
        return rows.dir / f"layer0-{name.replace('/', '-').replace(':', 'of')}.pt"

    for seed in cfg.seed_list:
        windows_path = rows.dir / f"windows-s{seed}.pt"
        windows = sample_windows(docs, tokenizer, cfg.calib_samples, cfg.seq_len, seed)
        torch.save(windows, windows_path)
        for pattern in cfg.pattern_list:
            for method in cfg.method_list:
                name = f"{pattern}/{method}/s{seed}"
                if rows.get(name) is not None:
                    continue
                out = rows.dir / "model"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                args = [cfg.python, str(DRIVER), method, cfg.repo(method), cfg.model, str(windows_path), pattern,
                        str(cfg.sparsity), str(out)]  # fmt: skip
                res = subprocess.run(args, capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
                run = json.loads((out / "published_run.json").read_text())
                model = load_causal_lm(str(out), name, torch.float32)
                torch.save(layer0_masks(model), masks_file(name))
                rows.add({"name": name, "pattern": pattern, "method": method, "seed": seed,  # timed before scoring
                          "prune_seconds": run["prune_seconds"], "run_seconds": time.perf_counter() - start,
                          **scored(model)})  # fmt: skip
            for method, (variant, only) in itertools.product(cfg.method_list, cfg.variant_list):
                if only and only != pattern:
                    continue
                name = f"{pattern}/{method}/s{seed}{VARIANT}{variant}"
                if rows.get(name) is None:
                    model, seconds = prune_variant(cfg.model, windows, method, pattern, cfg.sparsity, variant)
                    theirs = masks_file(f"{pattern}/{method}/s{seed}")
                    differ = mask_differences(layer0_masks(model), torch.load(theirs)) if theirs.exists() else None
                    rows.add({"name": name, "pattern": pattern, "method": method, "seed": seed,
                              "prune_seconds": seconds, "layer0_mask_differs": differ, **scored(model)})  # fmt: skip
    reference = reference_versions(cfg.python)
    which = {"wanda": "locuslab/wanda {} (lib/prune.py prune_wanda)",
             "sparsegpt": "IST-DASLab/sparsegpt {} (llama.py llama_sequential, its defaults: not true-sequential, "
                          "blocksize 128, percdamp 0.01)",
             "d2prune": "20250516aaa/D2Prune {} (D2Prune_LLAMA with its Llama scripts' settings: s 1500, r1 1, r2 0, "
                        "D2-SparseGPT and D2-Wanda, self_attn.v_proj without an update)"}  # fmt: skip
    runs = ", ".join(which[m].format(git_commit(cfg.repo(m))[:7] if cfg.repo(m) else "-") for m in cfg.method_list)
    how = (f"bench/studies/sparsity_published.py: {runs}, run "
           f"unchanged under torch {reference['torch']} + transformers {reference['transformers']} by "
           f"bench/studies/published_driver.py, which hands them this study's calibration windows in place of their "
           f"hub C4 loaders, loads the model in fp32 "
           f"(their scripts: fp16 / the checkpoint's dtype; fp16 is impractical on CPU) with eager attention and "
           f"RoPE's theta copied from transformers 5's rope_parameters to the rope_theta 4.x reads, and saves it; "
           f"scored here on the WikiText-2 windows of docs/SPARSITY.md. Rows ending /ours-VARIANT: our pruning "
           f"(prune.py's prune_weights) again on the same windows with rounding-level changes: eager = the model "
           f"loaded with the eager attention the published code runs, batchN = calibration batches of N windows, "
           f"jitterS = the embeddings times 1 + 1e-6 N(0, 1) (seed S) while pruning, restored before scoring; "
           f"scored with SDPA like every row; their layer0_mask_differs: per linear of decoder layer 0, the positions "
           f"whose removed/kept state differs from the published model's.")  # fmt: skip
    calibration = {"file": cfg.calib_file, "samples": cfg.calib_samples, "seq_len": cfg.seq_len}
    return {"about": how, "calibration": calibration, "reference": reference, "versions": versions(),
            "rows": rows.rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return reference_main(PublishedConfig, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
