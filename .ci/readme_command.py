"""Prints one of the README's two commands, exactly as written, so that CI runs what a newcomer types.

python3 .ci/readme_command.py first   # the first ```bash block under "## Quick start"
python3 .ci/readme_command.py tests   # the first ```bash block under "## Tests"
"""

import pathlib
import re
import sys

SECTIONS = {"first": "## Quick start", "tests": "## Tests"}


def command(readme: str, which: str) -> str:
    """The first bash code block after the heading that starts with `SECTIONS[which]`."""
    start = readme.index("\n" + SECTIONS[which]) + 1
    block = re.search(r"```bash\n(.*?)\n```", readme[start:], re.S)
    if block is None:
        raise SystemExit(f"README.md: no ```bash block under {SECTIONS[which]!r}")
    return block.group(1).strip()


if __name__ == "__main__":
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    print(command(text, sys.argv[1]))
