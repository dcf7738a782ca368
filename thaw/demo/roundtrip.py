"""The demo (`thawctl demo`): freeze the embedded tiny Llama, restore it into a fresh model,
compare outputs.

Runs on the CPU anywhere and on CUDA where a GPU is present; no download, no daemon needed.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from thaw.copy.freeze import freeze_file
from thaw.copy.restore import TransferStats, restore_file
from thaw.demo import tiny

PROMPT = "the quick brown fox jumps over the lazy dog and"


@dataclasses.dataclass(frozen=True)
class DemoResult:
    device: str
    snapshot_bytes: int
    freeze: TransferStats
    restore: TransferStats
    original: list[int]
    before_restore: list[int]
    restored: list[int]

    @property
    def identical(self) -> bool:
        return self.original == self.restored


def run(device: str | None = None, directory: str | None = None) -> DemoResult:
    """Freeze tiny model A, restore it into model B (other random weights), greedy-decode both."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = tiny.build_tokenizer()
    original_model = tiny.build_model(seed=0)
    fresh_model = tiny.build_model(seed=1)
    for model in (original_model, fresh_model):
        torch.nn.Module.to(model, device)  # in place; transformers retypes its own .to()
    original = tiny.generate_greedy(original_model, tokenizer, PROMPT)
    before = tiny.generate_greedy(fresh_model, tokenizer, PROMPT)
    with tempfile.TemporaryDirectory(prefix="thaw-demo-", dir=directory) as tmp:
        path = Path(tmp) / "tiny.thaw"
        frozen = freeze_file(original_model, path)
        restored_stats = restore_file(fresh_model, path)
        size = path.stat().st_size
    restored = tiny.generate_greedy(fresh_model, tokenizer, PROMPT)
    return DemoResult(device, size, frozen, restored_stats, original, before, restored)


def report(result: DemoResult) -> str:
    """The demo's output for a person."""
    lines = [
        f"thaw demo on {result.device}: tiny Llama ({result.snapshot_bytes / 1e6:.1f} MB snapshot)",
        f"  freeze   {_ms(result.freeze)}",
        f"  restore  {_ms(result.restore)}",
        f"  greedy output of the original model : {result.original}",
        f"  fresh model before restore          : {result.before_restore}",
        f"  fresh model after restore           : {result.restored}",
        "  bit-identical: " + ("yes" if result.identical else "NO"),
    ]
    return "\n".join(lines)


def _ms(stats: TransferStats) -> str:
    return f"{stats.bytes / 1e6:8.2f} MB in {stats.seconds * 1e3:7.1f} ms ({stats.gbps:.2f} GB/s)"


if __name__ == "__main__":
    outcome = run()
    print(report(outcome))
    raise SystemExit(0 if outcome.identical else 1)
