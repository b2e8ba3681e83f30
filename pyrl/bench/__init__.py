"""The benchmark suite behind ``pyrl bench``: pyrl against plain PyTorch, torch.compile, Liger-Kernel
and Cut Cross-Entropy, on the same inputs, with time, peak memory and a float64 correctness check.

    cases.py      the ops, their seeded inputs and the scalar each implementation differentiates
    reference.py  the float64 answer (chunked, independent of pyrl's kernels)
    impls.py      the registry of implementations: (op, name) -> build(case) -> step()
    measure.py    one timing function, one memory function, the correctness check
    runner.py     the command line and the loop over shapes, ops and implementations
    report.py     results.json, results.md and the PNG plots

``pytest benchmarks/ --benchmark-only`` runs the same registry under pytest-benchmark.
"""
from pyrl.bench.impls import REGISTRY, Impl, implementations, register
from pyrl.bench.runner import run

__all__ = ["run", "REGISTRY", "Impl", "register", "implementations"]
