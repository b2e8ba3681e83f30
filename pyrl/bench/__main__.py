"""``python -m pyrl.bench`` is ``pyrl bench``."""
import sys

from pyrl.bench import run

sys.exit(run())
