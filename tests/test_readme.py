"""The README's two set-up commands and CI stay in sync."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command(n):
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- command-{n} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, f"README.md lost its command-{n} block"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == _command(2)


def test_readme_opens_with_the_two_commands():
    one, two = _command(1), _command(2)
    assert "python -m train" in one and "python -m sample" in one
    assert "pytest" in two and "[test]" in two
    text = (ROOT / "README.md").read_text()
    assert text.index("command-1") < text.index("command-2") < text.index("## A short tour")
