"""Every ```python block of README.md and docs/*.md runs alone, in a fresh process (forked
from one that has imported jaxgrad, tests/_block_server.py; sharing only a compilation
cache with the blocks before it).

Each block is a complete program: its own imports and data, nothing from the blocks before it.
Shell commands are fenced ```bash and output ```text; those are not run (the quick start's
commands are checked against .ci/run in tests/test_readme.py). Relative links must resolve.
"""

import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _xla_flags import FAST_COMPILE

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
def block_server(tmp_path_factory):
    """One process (per test process: each pytest-xdist worker has its own) that has
    imported jaxgrad and forks a fresh process for every block (tests/_block_server.py):
    a block no longer pays for an interpreter and ``import jaxgrad`` (2.2 s of CPU each).

    The blocks it runs share one XLA compilation cache: blocks that build the same program
    (the digits MLP under several privacy configurations) compile it once. A hit runs the
    executable XLA compiled for the identical program, options and flags, so no result
    changes; no block reads HLO text. Measured on docs/privacy.md's seven blocks, idle, run
    in turn: 82 s without, 71 s with."""
    folder = tmp_path_factory.mktemp("docs-server")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["JAX_COMPILATION_CACHE_DIR"] = str(folder / "xla-cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    # Every block compiles at LLVM -O0, as the test processes do (tests/conftest.py: the
    # results are the same to float64 round-off; compiling is most of a block's CPU time). A
    # block that needs several devices asks for them with `jax_num_cpu_devices`, keeping
    # these flags (setting XLA_FLAGS itself would replace them: docs/devices.md's two
    # training blocks took 1.6-2x the CPU so).
    env["XLA_FLAGS"] = FAST_COMPILE
    with open(folder / "server.err", "w") as err:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_block_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            bufsize=0,
        )
    yield server, folder
    server.stdin.close()
    server.wait(timeout=60)


def _reply(server, folder, timeout=None) -> dict:
    """The server's next line, read within ``timeout`` seconds (None if it did not come)."""
    line = b""
    while not line.endswith(b"\n"):
        if not select.select([server.stdout], [], [], timeout)[0]:
            return None
        chunk = server.stdout.read(1)
        if not chunk:
            pytest.fail(f"the block server died:\n{(folder / 'server.err').read_text()}")
        line += chunk
    return json.loads(line)


@pytest.mark.parametrize("code", list(_python_blocks()))
def test_python_block_runs_alone(code, tmp_path, block_server):
    server, folder = block_server
    (tmp_path / "block.py").write_text(code)
    files = {name: str(tmp_path / f) for name, f in (("code", "block.py"), ("out", "stdout"))}
    request = {**files, "err": str(tmp_path / "stderr"), "cwd": str(tmp_path)}
    server.stdin.write((json.dumps(request) + "\n").encode())
    pid = _reply(server, folder)["pid"]
    done = _reply(server, folder, timeout=300)
    if done is None:  # the block hung: end it, then fail with what it printed
        os.kill(pid, signal.SIGKILL)
        done = _reply(server, folder)
    stdout, stderr = ((tmp_path / n).read_text() for n in ("stdout", "stderr"))
    assert done["status"] == 0, f"status {done}\nstdout:\n{stdout}\nstderr:\n{stderr}"


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
