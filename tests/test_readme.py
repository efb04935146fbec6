"""The README is a five-minute front door, and CI runs the README's own quick-start commands.

That every ```python block (here and in docs/) runs alone is tests/test_docs.py.
"""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def _quick_start_commands():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", quick_start, flags=re.DOTALL)


def test_readme_is_at_most_200_lines():
    assert len(README.splitlines()) <= 200


def test_quick_start_is_two_commands_and_ci_runs_the_test_one_verbatim():
    commands = _quick_start_commands()
    assert len(commands) == 2
    bench, tests = commands
    assert bench.endswith("python -m jaxgrad.bench")  # the main job, on its default
    assert tests.endswith("python -m pytest -n 2")
    ci_lines = [line.strip() for line in CI.splitlines()]
    assert tests in ci_lines  # one line of .ci/run, character for character
    for step in ("pip install torch==", "pip install --no-deps backpack-for-pytorch=="):
        assert step in tests


def test_both_quick_start_commands_start_from_the_same_fresh_environment_as_ci():
    bench, tests = _quick_start_commands()
    fresh = "python3 -m venv .venv && . .venv/bin/activate && "
    assert bench.startswith(fresh) and tests.startswith(fresh)


def test_readme_has_the_three_examples():
    assert len(re.findall(r"^```python$", README, flags=re.MULTILINE)) == 3
