"""Tensor ops the host issues per inner-loop training pass (what bounds a pass on a GPU).

    .venv/bin/python scripts/count_ops.py [MODEL] [--adapters K] [--cpu-layout]

Trains K adapters on the demo self-edits for one pass and for three passes, counting every
aten op dispatched (a TorchDispatchMode), and prints the per-pass difference by op. The count
does not depend on the device, so it is measured on the CPU; by default the GPU code path is
forced (one row per sequence, block LoRA route), `--cpu-layout` counts the CPU path instead.
docs/benchmarks.md ("On a GPU") reports its figures.
"""

from __future__ import annotations

import argparse
import collections

from torch.utils._python_dispatch import TorchDispatchMode

from seal import lora as lora_mod
from seal.bench import BenchConfig, _jobs
from seal.domains.knowledge import demo_path, load_passages, load_teacher_self_edits
from seal.lora import LoRASpec, MultiLoRA
from seal.models import load_model
from seal.training import AdapterJob, TrainHP, text_example, train_adapters


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--cpu-layout", action="store_true")
    args = ap.parse_args()
    gpu_path = not args.cpu_layout
    if gpu_path:
        lora_mod._is_cpu = lambda _device: False
    lm = load_model(args.model, "cpu", "fp32", progress=lambda *a: None)
    passages = [p for p in load_passages("demo:eval") if p.questions]
    edits = load_teacher_self_edits(demo_path("teacher_self_edits"), passages)
    jobs = _jobs(BenchConfig(n=args.adapters), passages, edits, args.adapters)
    lora = MultiLoRA(lm.model, len(jobs), LoRASpec())

    def count(passes: int) -> collections.Counter:
        train_jobs = []
        for slot, job in enumerate(jobs):
            lora.reset(slot, job.seed)
            first = text_example(lm.tokenizer, job.texts[0], 2048)
            train_jobs.append(AdapterJob(slot, [first] * passes, job.seed, TrainHP(epochs=1)))
        with _Count() as c:
            train_adapters(lm.model, lora, train_jobs, 0, pack=not gpu_path)
        return c.ops

    one, three = count(1), count(3)
    per_pass = collections.Counter({k: (three[k] - one[k]) // 2 for k in three})
    print(f"{args.model}, {len(jobs)} adapters, {'GPU' if gpu_path else 'CPU'} code path")
    print(f"aten ops per training pass: {sum(per_pass.values())}")
    for name, n in per_pass.most_common(12):
        print(f"{n:8d}  {name}")


if __name__ == "__main__":
    main()
