"""Every ```python block of README.md and docs/*.md runs alone, in a fresh interpreter
(sharing only a compilation cache with the blocks before it).

Each block is a complete program: its own imports and data, nothing from the blocks before it.
Shell commands are fenced ```bash and output ```text; those are not run (the quick start's
commands are checked against .ci/run in tests/test_readme.py). Relative links must resolve.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]  # their python blocks run
LINKED = [*PAGES, ROOT / "CONTRIBUTING.md"]  # their links must resolve
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", flags=re.DOTALL | re.MULTILINE)
LANGUAGES = {"python", "bash", "text"}


def _blocks(page):
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(page.read_text())]


def _python_blocks():
    for page in PAGES:
        python = [code for lang, code in _blocks(page) if lang == "python"]
        for i, code in enumerate(python):
            yield pytest.param(code, id=f"{page.relative_to(ROOT)}[{i}]")


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    """One XLA compilation cache for the blocks this test process runs, one after another
    (each pytest-xdist worker has its own): blocks that build the same program (the digits
    MLP under several privacy configurations) compile it once. A hit runs the executable
    XLA compiled for the identical program, options and flags, so no result changes; no
    block reads HLO text. Measured on docs/privacy.md's seven blocks, idle, run in turn:
    82 s without, 71 s with."""
    return tmp_path_factory.mktemp("docs-xla-cache")


@pytest.mark.parametrize("code", list(_python_blocks()))
def test_python_block_runs_alone(code, tmp_path, compilation_cache):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    # Every block compiles at LLVM -O0, as the test processes do (tests/conftest.py: the
    # results are the same to float64 round-off; compiling is most of a block's CPU time). A
    # block that needs several devices asks for them with `jax_num_cpu_devices`, keeping
    # these flags (setting XLA_FLAGS itself would replace them: docs/devices.md's two
    # training blocks took 1.6-2x the CPU so).
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # a block that writes files writes them here
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_fence_names_its_language(page):
    """```python is run, ```bash is a command, ```text is output: nothing unlabelled."""
    text = page.read_text()
    assert text.count("```") % 2 == 0, "an unclosed fence"
    for lang, _ in _blocks(page):
        assert lang in LANGUAGES, f"a fence labelled {lang!r}; use one of {sorted(LANGUAGES)}"


def _anchors(page):
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_their_anchors_resolve(page):
    text = FENCE.sub("", page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        assert linked.exists(), f"{page.name} links to a missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name} links to a missing {target}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in DOCS:
        assert f"](docs/{page.name}" in readme, f"README does not link docs/{page.name}"
