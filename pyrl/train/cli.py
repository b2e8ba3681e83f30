"""``pyrl train``: run a preset or a config file.

    pyrl train --preset tiny --out runs/tiny
    pyrl train --preset smollm2-arith --out runs/smol --max-steps 20
    pyrl train --config my.yaml --out runs/x --set optim.lr=1e-6 --set algo.loss.beta=0.04
    pyrl train --preset tiny --out runs/tiny --resume        # continue from the newest checkpoint
    torchrun --nproc-per-node 2 -m pyrl.cli train --preset tiny --out runs/tiny-ddp

Exit status: 0 done; 1 a checkpoint problem; 2 a usage error or a missing package; 143 stopped by
SIGTERM after writing a checkpoint (``--resume`` continues); any other failure raises (status 1).
"""
from __future__ import annotations

import argparse
import json
import sys

from pyrl.train import faults, presets
from pyrl.train.config import TrainConfig, apply_overrides, load_config

__all__ = ["run", "build_parser", "config_from_args", "check_config"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyrl train",
        description="GRPO/PPO on a Hugging Face causal LM. Writes OUT/metrics.jsonl (one JSON object per step), "
                    "OUT/checkpoints/, OUT/curves.png and OUT/summary.json.",
        epilog=f"presets: {', '.join(presets.names())} (pyrl train --list-presets)")
    p.add_argument("--preset", help="a named configuration (see --list-presets)")
    p.add_argument("--config", help="a YAML or JSON file of TrainConfig fields (over the preset, if both)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--max-steps", type=int, help="RL steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (bitwise-reproducible on CPU)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--lr", type=float, help="optim.lr")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, dotted: --set rollout.group_size=16 --set algo.loss.beta=0.04")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    return p


def config_from_args(args) -> TrainConfig:
    cfg = presets.get_preset(args.preset) if args.preset else TrainConfig()
    if args.config:
        cfg = load_config(args.config, base=cfg)
    flags = []
    for name, key in (("max_steps", "max_steps"), ("seed", "seed"), ("device", "device"), ("lr", "optim.lr"),
                      ("save_every", "save_every")):
        value = getattr(args, name)
        if value is not None:
            flags.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    if args.deterministic:
        flags.append("deterministic=true")
    if args.no_progress:
        flags.append("progress=false")
    return apply_overrides(cfg, flags + list(args.set))


def check_config(cfg: TrainConfig) -> None:
    """Refuse, before any model is loaded, names and values the run would trip over later."""
    import pyrl
    from pyrl.train import recipes, tasks
    from pyrl.train.config import validate

    validate(cfg)
    pyrl.PolicyLossConfig(**cfg.algo.loss)  # raises naming the field
    recipes.Reward.from_config(cfg, tasks.Task())  # reward names, user functions, length shapers
    if cfg.algo.advantage not in pyrl.advantages.names():
        raise ValueError(f"unknown advantage estimator {cfg.algo.advantage!r}; available: "
                         f"{', '.join(pyrl.advantages.names())}")
    if cfg.task.name not in tasks.names():
        raise ValueError(f"unknown task {cfg.task.name!r}; available: {', '.join(tasks.names())}")
    n = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if n % cfg.algo.minibatches:
        raise ValueError(f"algo.minibatches={cfg.algo.minibatches} must divide the {n} sequences of a step")
    t = cfg.dist_timeout_s
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
        raise ValueError(f"dist_timeout_s must be a finite number of seconds > 0, got {t!r}")


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_presets:
        doc = presets.__doc__.split("\n\n", 1)[1]
        print(doc.rstrip())
        return 0
    if not args.preset and not args.config:
        print("pyrl train: give --preset NAME or --config FILE (pyrl train --list-presets)", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
        check_config(cfg)
        faults.from_env()  # a malformed PYRL_FAULT_* variable is a usage error
    except (ValueError, TypeError, OSError) as e:
        print(f"pyrl train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if not args.out:
        print("pyrl train: --out DIR is required", file=sys.stderr)
        return 2

    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        print("pyrl train: this configuration asks for a CUDA GPU (device=cuda) and none is available; "
              "pass --device cpu to run it on the CPU anyway", file=sys.stderr)
        return 2

    from pyrl.train import distributed
    from pyrl.train.checkpoint import CheckpointError
    from pyrl.train.loop import train

    try:
        train(cfg, args.out, resume=args.resume)
    except ImportError as e:  # a missing optional package: say which and how to install it
        print(f"pyrl train: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"pyrl train: {e}", file=sys.stderr)
        return 1
    except faults.Stopped as e:
        print(f"pyrl train: {e}", file=sys.stderr)
        return faults.EXIT_STOPPED
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run())
