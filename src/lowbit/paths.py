"""Where lowbit keeps converted models and extracted texts (override with $LOWBIT_HOME)."""

import os
from pathlib import Path


def lowbit_home() -> Path:
    home = Path(os.environ.get("LOWBIT_HOME", Path.home() / ".cache" / "lowbit"))
    home.mkdir(parents=True, exist_ok=True)
    return home
