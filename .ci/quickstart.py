"""Print the commands of the README's Quick start block, one per line (CI runs exactly these)."""
import pathlib
import re
import sys


def quickstart_commands(readme: str) -> list[str]:
    section = re.search(r"^## Quick start\s*$(.*?)(?=^## )", readme, re.S | re.M)
    if section is None:
        raise SystemExit("README.md has no '## Quick start' section")
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", section.group(1), re.S)
    if len(blocks) != 1:
        raise SystemExit(f"the Quick start section must hold exactly one fenced code block, found {len(blocks)}")
    lines = [ln.strip() for ln in blocks[0].splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    print("\n".join(quickstart_commands((root / "README.md").read_text())))
