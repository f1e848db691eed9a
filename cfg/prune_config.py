"""Settings of prune.py. Defaults are the released HFPrune values (seq_len 1024, seed 42, C4, 1024 windows)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from module.dynamic.probe import METRICS as DYNAMIC_METRICS
from module.dynamic.wrap import VARIANTS as DYNAMIC_VARIANTS
from module.model.layout import HEAD_MODES, STRUCTURES
from module.prune.criteria import CRITERIA, DATA_FREE, STRUCTURE_CRITERIA, check_criterion
from module.prune.importance import GRADIENT_CRITERIA
from module.prune.mix import Mix
from module.prune.plan import StructureSizes
from module.prune.reconstruct import MODES as RECONSTRUCT_MODES
from module.prune.reconstruct import SELECTIONS as RECONSTRUCT_SELECTIONS
from module.prune.reconstruct import TARGETS as RECONSTRUCT_TARGETS
from module.prune.reconstruct import WEIGHTINGS as RECONSTRUCT_WEIGHTINGS
from module.prune.reconstruct import WRITERS as RECONSTRUCT_WRITERS
from module.prune.refit import default_damp
from module.sparse.masks import METHODS as SPARSITY_METHODS
from module.sparse.masks import UPDATES as SPARSITY_UPDATES
from module.sparse.masks import Pattern
from module.sparse.weight_taylor import FORMS as ENTROPY_FORMS
from utils.validate import Rule, check_applies, check_ranges

DTYPES = ("auto", "bfloat16", "float16", "float32")


def parse_ratios(text: str | None, flag: str, upper: float = math.inf) -> list[float]:
    """A comma list of distinct finite numbers in (0, upper); anything sloppy (empty items, nan) is refused."""
    if text is None or str(text).strip() == "":
        return []
    items = [v.strip() for v in str(text).split(",")]
    try:
        values = [float(v) for v in items]  # an empty item ("0.2,,0.3", "0.2,") fails here too
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be a number or a comma list of numbers, e.g. 0.2,0.3") from None
    for v in values:
        if not (math.isfinite(v) and 0 < v < upper):
            bound = f"in (0, {upper:g})" if math.isfinite(upper) else "> 0 and finite"
            raise ValueError(f"{flag} {text!r}: {v:g} is not valid; each value must be {bound}")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} {text!r} repeats a value")
    return values


@dataclass
class PruneConfig:
    """Every setting of prune.py. RULES gives each number its range and each flag the runs it applies to
    (utils/validate.py checks them for every run alike); what combines with what is checked in `__post_init__`."""

    KINDS: ClassVar[dict[str, str]] = {
        "structured": "structure pruning (--pruning_ratio, --mlp_ratio, --prune_parts or --mix)",
        "search": "a mix search (--prune_parts with --pruning_ratio alone) or --mix",
        "heads": "pruning attention heads (heads in --prune_parts)",
        "gradient": "a criterion that needs the gradient (entropy, ce, entropy_wanda)",
        "vocab_loss": "a loss over the vocabulary (criteria entropy, ce, entropy_wanda; a mix search; "
        "--sparsity_method entropy)",
        "sparse": "weight sparsity (--sparsity)",
        "sparsegpt": "SparseGPT's update (--sparsity_method sparsegpt or d2prune, or --sparsity_update sparsegpt)",
        "d2prune": "--sparsity_method d2prune",
        "sparse_entropy": "--sparsity_method entropy",
        "eval": "a perplexity evaluation (--eval_text)",
        "reconstruct": "compensation after removal (--reconstruct bias or ls)",
        "reconstruct_search": "--reconstruct bias/ls with a mix search",
        "dynamic": "dynamic pruning (--dynamic probe)",
        "dynamic_prior": "--dynamic_prior entropy",
    }  # fmt: skip
    RULES: ClassVar[dict[str, Rule]] = {  # ranges of the numbers, and the runs a flag applies to
        "pruning_ratio": Rule(applies=("structured", "dynamic")),
        "mlp_ratio": Rule(applies=("structured",)),
        "prune_parts": Rule(applies=("structured", "dynamic")),
        "mix": Rule(applies=("structured",)),
        "search_steps": Rule(low=1, applies=("search",)),
        "search_tolerance": Rule(low=0, high=1, high_open=True, applies=("search",)),
        "search_windows": Rule(low=1, applies=("search",)),
        "search_refine": Rule(low=0, applies=("search",)),
        "search_candidates": Rule(low=1, applies=("search",)),
        "measure_speed": Rule(applies=("structured", "dynamic")),
        "heads_keep": Rule(low=0, applies=("structured",)),
        "head_mode": Rule(applies=("heads",)),
        "layers_remove": Rule(low=0, applies=("structured",)),
        "hidden_keep": Rule(low=0, applies=("structured",)),
        "criterion": Rule(applies=("structured",)),
        "structure_criteria": Rule(applies=("structured",)),
        "calib_samples": Rule(low=1),
        "seq_len": Rule(low=2),
        "sparsity": Rule(low=0, high=1, low_open=True, high_open=True),
        "sparsity_type": Rule(applies=("sparse",)),
        "sparsity_method": Rule(applies=("sparse",)),
        "sparsity_update": Rule(applies=("sparse",)),
        "d2_r1": Rule(low=0, applies=("d2prune",)),
        "d2_r2": Rule(low=0, applies=("d2prune",)),
        "d2_s": Rule(low=0, low_open=True, applies=("d2prune",)),
        "sparsegpt_block": Rule(low=1, applies=("sparsegpt",)),
        "sparsegpt_damp": Rule(low=0, high=1, high_open=True, applies=("sparsegpt",)),
        "offload_inputs": Rule(applies=("sparse", "reconstruct")),
        "entropy_form": Rule(applies=("sparse_entropy",)),
        "seed": Rule(low=0),
        "batch_size": Rule(low=1),
        "loss_chunk_tokens": Rule(low=1, applies=("vocab_loss",)),
        "activation_checkpointing": Rule(applies=("gradient",)),
        "round_to": Rule(low=1, applies=("structured",)),
        "importance_cache": Rule(applies=("structured", "dynamic_prior")),
        "recompute": Rule(applies=("structured", "dynamic_prior")),
        "eval_seq_len": Rule(low=2, applies=("eval",)),
        "eval_windows": Rule(low=0, applies=("eval",)),
        "reconstruct": Rule(applies=("structured",)),
        "reconstruct_target": Rule(applies=("reconstruct",)),
        "reconstruct_writers": Rule(applies=("reconstruct",)),
        "reconstruct_weighting": Rule(applies=("reconstruct",)),
        "reconstruct_select": Rule(applies=("reconstruct",)),
        "reconstruct_damp": Rule(low=0, applies=("reconstruct",)),
        "reconstruct_samples": Rule(low=1, applies=("reconstruct",)),
        "reconstruct_rescore": Rule(low=0, applies=("reconstruct_search",)),
        "dynamic_variant": Rule(applies=("dynamic",)),
        "dynamic_metric": Rule(applies=("dynamic",)),
        "dynamic_prior": Rule(applies=("dynamic",)),
    }

    origin_path: str = field(metadata={"help": "Model to prune: a local Hugging Face folder or a hub id."})
    pruning_ratio: str | None = field(
        default=None,
        metadata={"help": "Fraction of ALL parameters to remove (MLP neurons only); a comma list such as 0.2,0.3 "
                          "writes several models from one importance pass."},
    )  # fmt: skip
    mlp_ratio: str | None = field(
        default=None,
        metadata={"help": "The release's size: keep k = int(mlp_ratio * hidden_size) neurons per layer (comma list "
                          "allowed). Give this or --pruning_ratio."},
    )  # fmt: skip
    prune_parts: str = field(
        default="mlp",
        metadata={"help": f"Comma list of the structures to prune: {', '.join(STRUCTURES)}, or auto (every structure "
                          "the family supports). With --heads_keep/--layers_remove/--hidden_keep for each listed "
                          "structure, mlp takes its share from --pruning_ratio/--mlp_ratio; without them, "
                          "--pruning_ratio is the total and the mix that moves the model's predictions least "
                          "(held-out KL) is searched."},
    )  # fmt: skip
    mix: str | None = field(
        default=None,
        metadata={"help": "Prune exactly this mix, as the search's leaderboard writes it (e.g. "
                          "mlp_keep=1152,heads_keep=6,layers_remove=2); with the search's --prune_parts it reuses its"
                          " cache."},
    )  # fmt: skip
    search_steps: int = field(
        default=4,
        metadata={"help": "Search grid: each structure besides the MLP is offered at the sizes removing about 0, 1/N,"
                          " ..., N/N of the target."},
    )  # fmt: skip
    search_tolerance: float = field(
        default=0.01,
        metadata={"help": "Without mlp in the search, how far a mix may land from --pruning_ratio (absolute)."},
    )  # fmt: skip
    search_windows: int = field(
        default=16,
        metadata={"help": "Held-out calibration windows (disjoint from the importance windows) for the search's KL."},
    )  # fmt: skip
    search_refine: int = field(
        default=4,
        metadata={"help": "Rounds of hill climbing from the grid's best: each scores the mixes one loadable step of "
                          "one structure away (the MLP refilled), stopping when the best stays best (0 = the grid "
                          "only)."},
    )  # fmt: skip
    search_candidates: int = field(
        default=64, metadata={"help": "At most this many candidates are scored."}
    )
    measure_speed: bool = field(
        default=False,
        metadata={"help": "Time prefill (1024-token prompt) and greedy decoding (batch 1 and 8) of the dense and the "
                          "pruned model; in a search, of every candidate (each sliced in turn: one extra model copy)."},
    )  # fmt: skip
    heads_keep: int = field(
        default=0,
        metadata={"help": "Attention (query) heads kept per layer (--prune_parts heads)."},
    )
    head_mode: str = field(
        default="kv_group",
        metadata={"help": "kv_group: remove whole key/value groups with their query heads; query: the same number of "
                          "query heads inside every group."},
    )  # fmt: skip
    layers_remove: int = field(
        default=0, metadata={"help": "Decoder layers to remove (--prune_parts layers)."}
    )
    hidden_keep: int = field(
        default=0,
        metadata={"help": "Hidden (residual) channels kept (--prune_parts hidden)."},
    )
    criterion: str = field(
        default="entropy",
        metadata={"help": f"Score: {', '.join(CRITERIA)} for MLP neurons; heads: "
                          f"{', '.join(STRUCTURE_CRITERIA['heads'])}; layers: "
                          f"{', '.join(STRUCTURE_CRITERIA['layers'])}; hidden: "
                          f"{', '.join(STRUCTURE_CRITERIA['hidden'])}."},
    )  # fmt: skip
    structure_criteria: str = field(
        default="",
        metadata={"help": "Per structure, a criterion other than --criterion (e.g. layers=block_influence: the "
                          "searched mix removes ShortGPT's layers and scores the rest by --criterion; SmolLM2, 4 "
                          "layers: 58.8 perplexity against entropy's 140.3, docs/STRUCTURES.md). A gradient "
                          "criterion here must be --criterion itself: the pass backpropagates one loss."},
    )  # fmt: skip
    calib_dataset: str = field(
        default="c4",
        metadata={"help": "Calibration text: 'c4' (allenai/c4 en, the release's), a hub dataset id, a local "
                          ".json/.jsonl/.txt/.parquet file or folder, or 'builtin' (offline standard-library prose)."},
    )  # fmt: skip
    calib_text_field: str = field(default="text", metadata={"help": "Field holding the text in records."})
    calib_samples: int = field(
        default=0,
        metadata={"help": "Calibration windows, at most one per document (0 = 1024, the release's; with --sparsity "
                          "128, Wanda's; with --dynamic 2000, Probe Pruning's)."},
    )  # fmt: skip
    seq_len: int = field(
        default=0,
        metadata={"help": "Tokens per calibration window (0 = 1024, the release's; with --sparsity the model's "
                          "context capped at 2048, Wanda's; with --dynamic 1024, Probe Pruning's evaluation length)."},
    )  # fmt: skip
    sparsity: float = field(
        default=0.0,
        metadata={"help": "Remove this share of the weights of every decoder linear layer instead of structures (e.g."
                          " 0.5; not with --pruning_ratio/--mlp_ratio/--prune_parts/--mix)."},
    )  # fmt: skip
    sparsity_type: str = field(
        default="unstructured",
        metadata={"help": "unstructured, or N:M (N zeros in every M inputs: 2:4, 4:8)."},
    )
    sparsity_method: str = field(
        default="wanda",
        metadata={"help": f"With --sparsity: {', '.join(SPARSITY_METHODS)} (magnitude needs no calibration data)."},
    )  # fmt: skip
    sparsity_update: str = field(
        default="none",
        metadata={"help": "none, or sparsegpt: after a magnitude/wanda/entropy mask, SparseGPT's update of the "
                          "remaining weights."},
    )  # fmt: skip
    d2_r1: float = field(
        default=1.0, metadata={"help": "D²Prune's lambda_1 (first-order activation term)."}    )
    d2_r2: float = field(
        default=0.0, metadata={"help": "D²Prune's lambda_2 (second-order activation term)."}    )
    d2_s: float = field(
        default=1500.0,
        metadata={"help": "D²Prune's activation scale s (its scripts: 1500)."}
    )
    sparsegpt_block: int = field(
        default=128,
        metadata={"help": "SparseGPT's column block (its mask granularity)."},
    )
    sparsegpt_damp: float = field(
        default=0.01,
        metadata={"help": "SparseGPT's dampening, x the mean Hessian diagonal."},
    )  # fmt: skip
    reconstruct: str = field(
        default="none",
        metadata={"help": "After removal (module/prune/reconstruct.py): none (the paper's: the units are dropped), "
                          "ls (each consumer of removed units refit by least squares on the calibration windows, "
                          "layer by layer; removed layers replaced by a linear map folded into the layer before) "
                          "or bias (FLAP's mean compensation in biases, where the family has or can add one)."},
    )  # fmt: skip
    reconstruct_target: str = field(
        default="dense",
        metadata={"help": "What a refit consumer should reproduce: the dense model's output on its own inputs "
                          "(dense: also corrects the error of the layers below) or the unpruned layer's on the "
                          "pruned inputs (own)."},
    )  # fmt: skip
    reconstruct_writers: str = field(
        default="pruned",
        metadata={"help": "Which writers of the residual stream (o_proj, down_proj) --reconstruct ls refits: pruned "
                          "(those that lost inputs) or all (every kept layer's, towards the dense stream: each layer "
                          "also repairs the error the layers below left after its attention; needs "
                          "--reconstruct_target dense)."},
    )  # fmt: skip
    reconstruct_weighting: str = field(
        default="rms",
        metadata={"help": "Token weights of a refit towards the residual stream (dense-target writers, layer maps): "
                          "rms (each token's error relative to the dense stream's mean square there, as the RMSNorm "
                          "reading it sees it; the attention-sink token's stream is ~100x the others', and "
                          "unweighted it rules the fit: SmolLM2 heads alone 2200 vs 492, docs/RECONSTRUCTION.md) or "
                          "uniform."},
    )  # fmt: skip
    reconstruct_select: str = field(
        default="scores",
        metadata={"help": "Which MLP neurons a layer keeps under --reconstruct ls: scores (the importance pass's, the "
                          "paper's) or obs (re-chosen in each layer by greedy elimination on the refit's own least "
                          "squares, the count per layer unchanged: each removed neuron is the one the refit of the "
                          "others repairs best; the importance pass still sizes the mix and scores other "
                          "structures). obs chooses on the refit's ridge, 0.3 by default: at 0.1 the choice fit the "
                          "noise of 21 tokens per neuron (SmolLM2, ratio 0.3, 128 x 256 windows: 158 perplexity; 92.6 "
                          "at 0.3)."},
    )  # fmt: skip
    reconstruct_damp: float | None = field(
        default=None,
        metadata={"help": "Ridge of the refit, x the mean diagonal of the pruned inputs' Gram matrix (towards the "
                          "plain sliced weights). Default 0.1 (0.1 and 0.3 equal on SmolLM2, 1 worse), 0.3 with "
                          "--reconstruct_select obs, whose choice fits the calibration's noise on a weaker ridge "
                          "(SmolLM2, 128 refit windows, ratio 0.2, seeds 0 / 1: 56.3 / 59.7 perplexity at 0.1, 54.6 / "
                          "59.3 at 0.3, 57.6 at 1; ratio 0.3: 158.3 at 0.1, 92.6 at 0.3; "
                          "docs/RECONSTRUCTION_OBS_RIDGE.md)."},
    )  # fmt: skip
    reconstruct_samples: int = field(
        default=0,
        metadata={"help": "Calibration windows of the refit (0 = --calib_samples): a refit fits a Gram matrix per "
                          "consumer and wants far more tokens than scoring; the first --calib_samples of them score."},
    )  # fmt: skip
    reconstruct_rescore: int = field(
        default=4,
        metadata={"help": "With a mix search: re-rank this many of the leaderboard's best by their held-out KL "
                          "after reconstruction, so the saved mix is the best reconstructed one (0 = off)."},
    )  # fmt: skip
    dynamic: str = field(
        default="none",
        metadata={"help": "probe: Probe Pruning (per batch, no weights removed): --pruning_ratio R of the MLP neurons "
                          "(and query heads with --prune_parts mlp,heads) chosen anew for every batch; writes a small "
                          "folder (history, settings, the origin's path) that evaluate.py and script/eval.sh load."},
    )  # fmt: skip
    dynamic_variant: str = field(
        default="probe",
        metadata={"help": f"With --dynamic probe: {', '.join(DYNAMIC_VARIANTS)} (probe + history + EMA, the "
                          "paper's; the whole batch as the probe; the probe without history; the history alone)."},
    )  # fmt: skip
    dynamic_metric: str = field(
        default="ppsp",
        metadata={"help": f"With --dynamic probe: the unit score, one of {', '.join(DYNAMIC_METRICS)}."},
    )  # fmt: skip
    dynamic_prior: str = field(
        default="none",
        metadata={"help": "With --dynamic probe: entropy scores MLP neurons by the entropy-Taylor importance of the "
                          "calibration windows, rescaled per batch by the probe's energy (none: PPsp alone)."},
    )  # fmt: skip
    entropy_form: str = field(
        default="abs",
        metadata={"help": "With --sparsity_method entropy: abs (sum over windows of |W * window gradient|; the "
                          "best measured, docs/SPARSITY_ENTROPY.md), fisher (sum over windows of (W * gradient)^2) "
                          "or sum (|W * sum of window gradients|, the neuron score's form)."},
    )  # fmt: skip
    offload_inputs: bool = field(
        default=False,
        metadata={"help": "With --sparsity or --reconstruct: keep the calibration activations on the CPU between "
                          "layers (large models)."},
    )  # fmt: skip
    allow_long_context: bool = field(
        default=False,
        metadata={"help": "Allow --seq_len/--eval_seq_len beyond the model's max_position_embeddings (rotary or other"
                          " computed positions only; a learned position table cannot be extended)."},
    )  # fmt: skip
    seed: int = field(default=42, metadata={"help": "Seed of the window draw (and of the random criterion)."})
    batch_size: int = field(
        default=1,
        metadata={"help": "Windows per forward/backward pass (a --reconstruct refit runs at least 8 per forward)."},
    )
    loss_chunk_tokens: int = field(
        default=0,
        metadata={"help": "Tokens per chunk of the vocabulary loss (0 = fp32 logits of ~256 MiB on CUDA, ~32 MiB "
                          "on CPU)."},
    )  # fmt: skip
    activation_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute each layer in the importance backward pass: much less activation memory (larger "
                          "batches, longer windows, bigger models) for about one more forward pass."},
    )  # fmt: skip
    dtype: str = field(
        default="auto",
        metadata={"help": f"Compute and saved dtype: {', '.join(DTYPES)}; auto = bfloat16 on CUDA, float32 on CPU."},
    )
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto (cuda if available)."})
    device_map: str | None = field(
        default=None,
        metadata={"help": "auto: shard the model over every visible GPU, for models larger than one GPU (one process;"
                          " not with accelerate launch)."},
    )  # fmt: skip
    round_to: int = field(
        default=1,
        metadata={"help": "Round the kept neurons to a multiple of this (1 = exact)."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Output folder (one ratio) or parent folder (several); default a descriptive name "
                          "under out/."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an existing output folder (the old one is removed only once the new one is "
                          "complete)."},
    )
    importance_cache: str = field(
        default="out/importance_cache",
        metadata={"help": "Folder of cached importance scores ('' disables)."},
    )
    recompute: bool = field(
        default=False, metadata={"help": "Ignore a cached importance entry and recompute."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    eval_text: str | None = field(
        default=None,
        metadata={"help": "Report perplexity before and after pruning on this text (same sources as --calib_dataset, "
                          "e.g. builtin:heldout or a WikiText file)."},
    )  # fmt: skip
    eval_seq_len: int = field(
        default=512, metadata={"help": "Window length of the perplexity evaluation."}
    )
    eval_windows: int = field(
        default=0, metadata={"help": "Evaluate only the first N windows (0 = all)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        check_ranges(self)
        self.criteria: dict[str, str] = {}  # a structured run's criterion of each structure (_check_structured)
        if self.dynamic != "none" and self.sparsity:
            raise ValueError("--dynamic and --sparsity are different runs; give one")
        if self.sparsity:
            self._check_sparsity()
        elif self.dynamic != "none":
            self._check_dynamic()
        else:
            self._check_structured()
        check_applies(self)

    def kinds(self) -> set[str]:
        """What this run is, in the words of KINDS (which flags apply to it)."""
        if self.dynamic != "none":
            kinds = {"dynamic"}
            if self.dynamic_prior != "none":
                kinds |= {"dynamic_prior", "gradient", "vocab_loss"}
        elif self.sparsity:
            kinds = {"sparse"}
            if self.sparsity_method in ("sparsegpt", "d2prune") or self.sparsity_update == "sparsegpt":
                kinds.add("sparsegpt")
            if self.sparsity_method == "d2prune":
                kinds.add("d2prune")
            if self.sparsity_method == "entropy":
                kinds |= {"vocab_loss", "sparse_entropy"}
        else:
            kinds = {"structured"}
            if self.search or self.selected_mix is not None:
                kinds |= {"search", "vocab_loss"}
            if self.criterion in GRADIENT_CRITERIA:
                kinds |= {"gradient", "vocab_loss"}
            if "heads" in self.parts:
                kinds.add("heads")
            if self.reconstruct != "none":
                kinds.add("reconstruct")
                if "search" in kinds:
                    kinds.add("reconstruct_search")
        if self.eval_text:
            kinds.add("eval")
        return kinds

    def run_text(self) -> str:
        if self.dynamic != "none":
            return f"--dynamic {self.dynamic} (per-batch pruning, --dynamic_variant {self.dynamic_variant})"
        if self.sparsity:
            return f"--sparsity removes single weights (--sparsity_method {self.sparsity_method})"
        return f"this structure pruning run (--prune_parts {self.prune_parts}, --criterion {self.criterion})"

    def _check_structured(self) -> None:
        self.calib_samples = self.calib_samples or 1024
        self.seq_len = self.seq_len or 1024
        self.pruning_ratios = parse_ratios(self.pruning_ratio, "--pruning_ratio", upper=1.0)
        self.mlp_ratios = parse_ratios(self.mlp_ratio, "--mlp_ratio")
        self.parts = list(STRUCTURES) if self.auto else [p.strip() for p in self.prune_parts.split(",")]
        if any(p not in STRUCTURES for p in self.parts) or len(set(self.parts)) != len(self.parts):
            raise ValueError(
                f"--prune_parts {self.prune_parts!r} must be auto or a comma list of distinct {', '.join(STRUCTURES)}"
            )
        if self.head_mode not in HEAD_MODES:
            raise ValueError(f"--head_mode {self.head_mode!r} is not one of {', '.join(HEAD_MODES)}")
        flags = {"heads": ("heads_keep", self.heads_keep), "layers": ("layers_remove", self.layers_remove),
                 "hidden": ("hidden_keep", self.hidden_keep)}  # fmt: skip
        given = [f"--{flag}" for flag, value in flags.values() if value]
        searchable = self.auto or (self.parts != ["mlp"] and not given)
        self.selected_mix = Mix.parse(self.mix) if self.mix is not None else None
        if self.selected_mix is not None:
            if self.pruning_ratios or self.mlp_ratios or given:
                raise ValueError(
                    "--mix gives every size; drop --pruning_ratio/--mlp_ratio/" + "/".join(given or ["..."])
                )
            outside = [p for p in self.selected_mix.parts if p not in self.parts]
            if outside:
                raise ValueError(
                    f"--mix prunes {', '.join(outside)}, which --prune_parts {self.prune_parts} leaves out"
                )
        elif searchable and self.pruning_ratios:
            if given:
                raise ValueError(f"--prune_parts {self.prune_parts} searches every size; drop {', '.join(given)}")
        elif self.auto:
            raise ValueError("--prune_parts auto searches a mix for --pruning_ratio R (the share of all parameters)")
        else:
            if "mlp" in self.parts and bool(self.pruning_ratios) == bool(self.mlp_ratios):
                raise ValueError("give exactly one of --pruning_ratio and --mlp_ratio")
            if "mlp" not in self.parts and (self.pruning_ratios or self.mlp_ratios):
                raise ValueError("--pruning_ratio/--mlp_ratio size the MLP: add mlp to --prune_parts or drop them")
            for part, (flag, value) in flags.items():
                if (part in self.parts) != (value > 0):
                    raise ValueError(
                        f"--prune_parts {part} goes with --{flag} N > 0 (got --{flag} {value}); or give only "
                        "--pruning_ratio to search the mix"
                    )
            if self.parts != ["mlp"] and len(self.sizes) > 1:
                raise ValueError("several sizes from one pass are for --prune_parts mlp only; give one --pruning_ratio")
        if "mlp" in self.parts and self.criterion not in CRITERIA:
            raise ValueError(f"--criterion {self.criterion!r} does not score MLP neurons; valid: {', '.join(CRITERIA)}")
        self.criteria = self._structure_criteria()
        for part in self.parts:
            if part != "mlp":
                check_criterion(part, self.criteria[part])
        if self.reconstruct not in RECONSTRUCT_MODES:
            raise ValueError(f"--reconstruct {self.reconstruct!r} is not one of {', '.join(RECONSTRUCT_MODES)}")
        if self.reconstruct_target not in RECONSTRUCT_TARGETS:
            raise ValueError(f"--reconstruct_target {self.reconstruct_target!r} is not one of "
                             f"{', '.join(RECONSTRUCT_TARGETS)}")  # fmt: skip
        if self.reconstruct_writers not in RECONSTRUCT_WRITERS:
            raise ValueError(f"--reconstruct_writers {self.reconstruct_writers!r} is not one of "
                             f"{', '.join(RECONSTRUCT_WRITERS)}")  # fmt: skip
        if self.reconstruct_weighting not in RECONSTRUCT_WEIGHTINGS:
            raise ValueError(f"--reconstruct_weighting {self.reconstruct_weighting!r} is not one of "
                             f"{', '.join(RECONSTRUCT_WEIGHTINGS)}")  # fmt: skip
        if self.reconstruct_select not in RECONSTRUCT_SELECTIONS:
            raise ValueError(f"--reconstruct_select {self.reconstruct_select!r} is not one of "
                             f"{', '.join(RECONSTRUCT_SELECTIONS)}")  # fmt: skip
        if self.reconstruct_select == "obs" and self.reconstruct not in ("none", "ls"):
            raise ValueError("--reconstruct_select obs chooses neurons by the least-squares refit: it needs "
                             "--reconstruct ls")  # fmt: skip
        if self.reconstruct_select == "obs" and self.reconstruct == "ls" and "hidden" in self.parts and not self.auto:
            raise ValueError("--reconstruct_select obs re-chooses MLP neurons on the full hidden width; with hidden "
                             "in --prune_parts use --reconstruct_select scores")  # fmt: skip
        if self.reconstruct == "bias" and self.parts == ["hidden"] and not self.auto:
            raise ValueError("--reconstruct bias puts back the mean of removed neurons, heads and layers; a removed "
                             "hidden channel leaves the residual stream, so with --prune_parts hidden alone it would "
                             "change nothing: use --reconstruct ls")  # fmt: skip
        if self.reconstruct_writers == "all" and self.reconstruct != "none" and (
                self.reconstruct != "ls" or self.reconstruct_target != "dense"):  # (none: the flag does not combine)
            raise ValueError("--reconstruct_writers all refits towards the dense stream: it needs --reconstruct ls "
                             "and --reconstruct_target dense")  # fmt: skip
        if self.reconstruct != "none" and self.reconstruct_target == "own" and "hidden" in self.parts:
            raise ValueError("--reconstruct_target own runs the unpruned layer on the pruned stream, which needs the "
                             "full hidden width; with hidden in --prune_parts use --reconstruct_target dense")
        self._check_dtype()

    def _check_dtype(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    def _check_sparsity(self) -> None:
        pattern = Pattern.parse(self.sparsity_type, self.sparsity)
        if pattern.structured and abs(pattern.sparsity - self.sparsity) > 1e-9:
            raise ValueError(f"--sparsity_type {self.sparsity_type} is {pattern.sparsity:g} sparsity; give --sparsity "
                             f"{pattern.sparsity:g}")  # fmt: skip
        if self.sparsity_method not in SPARSITY_METHODS:
            raise ValueError(f"--sparsity_method {self.sparsity_method!r} is not one of {', '.join(SPARSITY_METHODS)}")
        if self.entropy_form not in ENTROPY_FORMS:
            raise ValueError(f"--entropy_form {self.entropy_form!r} is not one of {', '.join(ENTROPY_FORMS)}")
        if self.sparsity_update not in SPARSITY_UPDATES:
            raise ValueError(f"--sparsity_update {self.sparsity_update!r} is not one of {', '.join(SPARSITY_UPDATES)}")
        self._check_dtype()
        self.calib_samples = self.calib_samples or 128
        self.pruning_ratios, self.mlp_ratios, self.parts, self.selected_mix = [], [], [], None

    def _check_dynamic(self) -> None:
        if self.dynamic != "probe":
            raise ValueError(f"--dynamic {self.dynamic!r} is not none or probe")
        ratios = parse_ratios(self.pruning_ratio, "--pruning_ratio", upper=1.0)
        if len(ratios) != 1:
            raise ValueError("--dynamic probe takes one --pruning_ratio R in (0, 1): the share of the MLP neurons (and "
                             "query heads) each batch removes")  # fmt: skip
        self.parts = [p.strip() for p in self.prune_parts.split(",")]
        if not set(self.parts) <= {"mlp", "heads"} or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"--dynamic probe prunes mlp and/or heads (query heads); --prune_parts "
                             f"{self.prune_parts!r} is not a comma list of them")  # fmt: skip
        if self.dynamic_variant not in DYNAMIC_VARIANTS:
            raise ValueError(f"--dynamic_variant {self.dynamic_variant!r} is not one of {', '.join(DYNAMIC_VARIANTS)}")
        if self.dynamic_metric not in DYNAMIC_METRICS:
            raise ValueError(f"--dynamic_metric {self.dynamic_metric!r} is not one of {', '.join(DYNAMIC_METRICS)}")
        if self.dynamic_prior not in ("none", "entropy"):
            raise ValueError(f"--dynamic_prior {self.dynamic_prior!r} is not none or entropy")
        with_history = self.dynamic_variant in ("probe", "history")
        if self.dynamic_prior != "none" and ("mlp" not in self.parts or not with_history):
            raise ValueError("--dynamic_prior entropy scores MLP neurons against the calibration history: it needs mlp "
                             "in --prune_parts and --dynamic_variant probe or history")  # fmt: skip
        self._check_dtype()
        self.calib_samples = self.calib_samples or 2000
        self.seq_len = self.seq_len or 1024
        self.pruning_ratios, self.mlp_ratios, self.selected_mix = ratios, [], None

    def _structure_criteria(self) -> dict[str, str]:
        """The criterion of every structure but the MLP's: --criterion, unless --structure_criteria names another."""
        given = {}
        for item in filter(None, (i.strip() for i in self.structure_criteria.split(","))):
            part, _, criterion = item.partition("=")
            part, criterion = part.strip(), criterion.strip()
            if part not in STRUCTURE_CRITERIA or not criterion or part in given:
                raise ValueError(f"--structure_criteria {self.structure_criteria!r} must be a comma list of distinct "
                                 f"STRUCTURE=CRITERION, STRUCTURE one of {', '.join(STRUCTURE_CRITERIA)}")  # fmt: skip
            if part not in self.parts:
                raise ValueError(f"--structure_criteria scores {part}, which --prune_parts {self.prune_parts} leaves "
                                 "out")  # fmt: skip
            if criterion in GRADIENT_CRITERIA and criterion != self.criterion:
                raise ValueError(f"--structure_criteria {part}={criterion} needs the gradients of its own loss; "
                                 f"the pass backpropagates --criterion {self.criterion}'s: give --criterion "
                                 f"{criterion}")  # fmt: skip
            given[part] = criterion
        return {part: given.get(part, self.criterion) for part in STRUCTURE_CRITERIA}

    @property
    def refit_damp(self) -> float:
        """--reconstruct_damp, or its default for the neuron selection in use."""
        if self.reconstruct_damp is not None:
            return self.reconstruct_damp
        return default_damp(self.reconstruct_select)

    @property
    def data_free(self) -> bool:
        """Every criterion of the run scores from the weights alone (no calibration pass)."""
        return all(c in DATA_FREE for c in (self.criterion, *(self.criteria[p] for p in self.parts if p != "mlp")))

    @property
    def auto(self) -> bool:
        return self.prune_parts.strip() == "auto"

    @property
    def search(self) -> bool:
        """Search the mix for each --pruning_ratio (no explicit sizes of the other structures, no --mix)."""
        return (
            self.selected_mix is None
            and bool(self.pruning_ratios)
            and self.structure_sizes.parts == []
            and (self.auto or self.parts != ["mlp"])
        )

    @property
    def sizes(self) -> list[tuple[str, float]]:
        """The MLP sizes given by --pruning_ratio/--mlp_ratio (none when the MLP is not pruned, or when a
        search or --mix decides every size)."""
        if self.search or self.selected_mix is not None:
            return []
        kind = "pruning_ratio" if self.pruning_ratios else "mlp_ratio"
        return [(kind, v) for v in (self.pruning_ratios or self.mlp_ratios)]

    @property
    def structure_sizes(self) -> StructureSizes:
        return StructureSizes(self.heads_keep, self.head_mode, self.layers_remove, self.hidden_keep)
