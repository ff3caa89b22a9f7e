"""Print one of the README's two shell commands (0: setup, 1: tests), so CI runs them verbatim."""
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def commands() -> list[str]:
    """The README's ```bash blocks, in order."""
    return [body.strip() for body in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)]


if __name__ == "__main__":
    print(commands()[int(sys.argv[1])])
