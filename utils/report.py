"""Run reports: versions, peak memory, the JSON report and the per-layer plot."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import logging
import platform
import resource
import subprocess
import sys
import threading
from pathlib import Path

import torch

from utils.atomic import atomic_write_text

log = logging.getLogger("hfprune")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)  # also when the root logger was configured by someone else


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import accelerate
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name(),
    }
    try:
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=5
        )
        out["hfprune_commit"] = res.stdout.strip() if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        out["hfprune_commit"] = None
    return out


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or on CPU the process's peak resident set size (over its whole life)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def resident_bytes() -> int | None:
    """The process's resident set size now (Linux), else None."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return None


class PeakMemory:
    """The peak memory of a `with` block, `.bytes` after it (`.above_start`: the part above what was in use on
    entry): on CUDA the allocator's peak, reset on entry; on CPU the resident set sampled every `interval` seconds
    by a thread. ru_maxrss cannot be reset: read after a block it is the peak of everything the process ran before
    (a study runs many prune.py calls in one process)."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval, self.bytes, self.start = device, interval, 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def above_start(self) -> int:
        return max(self.bytes - self.start, 0)

    def _sample(self) -> None:
        self.bytes = max(self.bytes, resident_bytes() or 0)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = int(torch.cuda.memory_allocated(self.device))
        elif resident_bytes() is not None:
            _return_free_heap()
            self._sample()
            self.start = self.bytes
            self._thread = threading.Thread(target=self._watch, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # CUDA, or a CPU without /proc: the lifetime peak is the best there is
        self.bytes = peak_memory_bytes(self.device)


def _return_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc), so the resident set starts from what is in use."""
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL(libc).malloc_trim(0)


def write_json(path: Path, obj: dict) -> None:
    """JSON written atomically (a reader never sees half a report) with the user's umask."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def kept_share(scores: list[torch.Tensor], keep: list[torch.Tensor]) -> list[float]:
    """Per layer, the share of the score mass that the kept units hold (nan where the scores sum to 0)."""
    return [float(s[k].sum() / s.sum()) if float(s.sum()) > 0 else float("nan") for s, k in zip(scores, keep)]


def plot_layer_scores(path: Path, scores: list[torch.Tensor], keep: list[torch.Tensor], title: str) -> None:
    """Two panels: per-layer score spread with the keep threshold, and the share of score mass kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(scores)))
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    spread = torch.stack([torch.quantile(s.double(), q) for s in scores])
    threshold = [float(s[k].min()) if len(k) else float("nan") for s, k in zip(scores, keep)]
    kept_mass = kept_share(scores, keep)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.fill_between(layers, spread[:, 0], spread[:, 2], alpha=0.3, label="10-90% of neurons")
    a.plot(layers, spread[:, 1], label="median score")
    a.plot(layers, threshold, "k--", label="lowest kept score")
    if float(spread[:, 0].min()) > 0:
        a.set_yscale("log")
    a.set(xlabel="layer", ylabel="neuron score", title="score per layer")
    a.legend()
    b.bar(layers, kept_mass)
    b.set(
        xlabel="layer",
        ylabel="kept share of score mass",
        ylim=(0, 1),
        title=f"{len(keep[0])} of {len(scores[0])} neurons kept per layer",
    )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_structures(
    path: Path,
    scores: dict[str, torch.Tensor],
    kept: dict[str, torch.Tensor],
    neuron_scores: list[torch.Tensor],
    neuron_keep: list[torch.Tensor] | None,
    title: str,
) -> None:
    """One panel per pruned structure: its scores with the kept units marked (heads as a layer x head map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    heads = sorted((k for k in scores if k.startswith("heads.layer.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if heads:
        panels.append("heads")
    panels += [p for p in ("layers", "hidden") if p in scores]
    if neuron_keep:
        panels.append("mlp")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "heads":
            grid = torch.stack([scores[k] for k in heads]).double()
            ax.imshow(grid.log1p(), aspect="auto", cmap="viridis")
            for layer, k in enumerate(heads):
                for h in kept[k].tolist():
                    ax.plot(h, layer, "w.", markersize=4)
            ax.set(xlabel="query head", ylabel="layer", title="head scores (log1p); dots = kept")
        elif panel == "layers":
            s = scores["layers"].double()
            keep = set(kept["layers"].tolist())
            ax.bar(range(len(s)), s, color=["tab:blue" if i in keep else "tab:red" for i in range(len(s))])
            ax.set(xlabel="layer", ylabel="score", title=f"layers: {len(s) - len(keep)} removed (red)")
        elif panel == "hidden":
            s = scores["hidden"].double().sort(descending=True).values
            ax.plot(s)
            ax.axvline(len(kept["hidden"]) - 0.5, color="k", ls="--")
            ax.set(xlabel="hidden channel (sorted)", ylabel="score", yscale="log" if float(s.min()) > 0 else "linear",
                   title=f"hidden: {len(kept['hidden'])} of {len(s)} kept")  # fmt: skip
        else:
            kept_mass = kept_share(neuron_scores, neuron_keep)
            ax.bar(range(len(kept_mass)), kept_mass)
            ax.set(xlabel="layer", ylabel="kept share of neuron score mass", ylim=(0, 1),
                   title=f"MLP: {len(neuron_keep[0])} of {len(neuron_scores[0])} neurons kept")  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_curve(path: Path, log_history: list[dict], title: str) -> bool:
    """Training loss (and learning rate) per logged step; False when nothing was logged."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
    ax.set(xlabel="optimizer step", ylabel="training loss (mean over label tokens)", title=title)
    lrs = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h and "step" in h]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="tab:orange", alpha=0.6)
        ax2.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


STRUCTURE_COLORS = {"mlp": "tab:blue", "heads": "tab:orange", "layers": "tab:red", "hidden": "tab:green"}


def plot_leaderboard(path: Path, board: list[dict], title: str) -> None:
    """The mix search's candidates, best (lowest held-out KL) on top: their KL, and which structures each
    one's removed parameters came from (with the prefill speed-up when it was measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = board[::-1]  # barh draws bottom-up
    y = range(len(rows))
    fig, (kl_ax, mix_ax) = plt.subplots(1, 2, figsize=(13, 0.3 * len(rows) + 1.8), sharey=True)
    kl_ax.barh(y, [r["kl"] for r in rows], color=["tab:purple" if r is board[0] else "tab:gray" for r in rows])
    kl_ax.set(yticks=list(y), xlabel="held-out KL(dense || pruned) per token", title="candidates (best on top)")
    kl_ax.set_yticklabels([r["mix"] for r in rows], fontsize=7)
    left = [0.0] * len(rows)
    for part, color in STRUCTURE_COLORS.items():
        share = [r["removed"].get(part, 0) / (r["removed"] and sum(r["removed"].values()) or 1) for r in rows]
        mix_ax.barh(y, share, left=left, color=color, label=part)
        left = [a + b for a, b in zip(left, share)]
    for i, r in enumerate(rows):
        if r.get("speed"):
            mix_ax.text(1.01, i, f"{r['speed']['prefill_speedup']:.2f}x", va="center", fontsize=7)
    mix_ax.set(xlim=(0, 1.12), xlabel="share of the removed parameters (text: prefill speed-up)")
    mix_ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_flops(device) -> float | None:
    """Dense bf16 peak of the card, for MFU (H100 and H200 SXM: 989 TFLOP/s, A100: 312); None where unknown."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return 989e12 if ("H100" in name or "H200" in name) else 312e12 if "A100" in name else None


def train_flops_per_token(model) -> float:
    """Matmul FLOPs per trained token: 2N forward, 2N for the input gradients, 2N_trainable for the weight gradients
    (6N in full fine-tuning, as nanoGPT counts; about 4N with LoRA); attention scores are not counted."""
    params = list(model.parameters())
    return 4 * sum(p.numel() for p in params) + 2 * sum(p.numel() for p in params if p.requires_grad)
