"""How the tests launch stock LLaMA-Factory: its console script of this interpreter's environment."""
import shutil
import sys
from pathlib import Path


def llamafactory_cli(*args: str) -> list[str]:
    """The `llamafactory-cli` console script of this interpreter's environment (or on PATH)."""
    script = Path(sys.executable).parent / "llamafactory-cli"
    found = str(script) if script.is_file() else shutil.which("llamafactory-cli")
    assert found, "llamafactory-cli not found next to this python nor on PATH"
    return [found, *args]
