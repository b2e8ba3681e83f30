"""The ``pyrl`` command line: ``pyrl bench``, ``pyrl train``, ``pyrl info``."""
from __future__ import annotations

import argparse
import json
import sys

USAGE = """pyrl <command> [options]

commands:
  bench   benchmark pyrl's ops against PyTorch, torch.compile and Liger-Kernel (pyrl bench --help)
  train   GRPO/PPO training on a Hugging Face model (pyrl train --help)
  info    what this installation can run (backends, build)
"""


def _info(argv) -> int:
    argparse.ArgumentParser(prog="pyrl info", description="Report pyrl's backends and build.").parse_args(argv)
    import pyrl

    print(json.dumps({"pyrl": pyrl.__version__, "backends": pyrl.backends()}, indent=2))
    return 0


def _bench(argv) -> int:
    from pyrl import bench

    return bench.run(argv)


def _train(argv) -> int:
    try:
        from pyrl.train import cli as train_cli
    except ImportError as exc:
        print(f"pyrl train needs the trainer's dependencies ({exc}); install them with\n"
              "    pip install 'pyrl[train]'   (transformers, safetensors, tqdm, pyyaml, matplotlib)",
              file=sys.stderr)
        return 2
    return train_cli.run(argv)


COMMANDS = {"bench": _bench, "train": _train, "info": _info}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        import pyrl

        print(pyrl.__version__)
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"pyrl: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return cmd(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
