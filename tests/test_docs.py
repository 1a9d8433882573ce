"""The documentation stays true: the MkDocs site builds in strict mode, the README stays a front door, every relative
link resolves, and the cheap commands that README.md and docs/ mark for it run.

A doc writer marks a code block for this test by writing, on the line just before its opening fence,
`<!-- tests/test_docs.py runs each command of the next block -->`. Each logical line of the block (a line ending in
`\\` continues on the next; blank and comment-only lines are skipped) runs with bash from the repository root and
must exit 0; a `--help` command may exit 1 after printing its flags, as absl's does.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
README = os.path.join(REPO, "README.md")
MAX_README_LINES = 250
RUN_MARKER = "<!-- tests/test_docs.py runs each command of the next block -->"
CI_TEST_COMMAND = re.compile(r"^python3 -m venv .*pytest")  # the line .ci/run greps and runs
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def doc_files() -> list[str]:
    """README.md and every Markdown page under docs/."""
    pages = [os.path.join(root, name) for root, _, names in os.walk(DOCS) for name in names if name.endswith(".md")]
    return [README] + sorted(pages)


def prose_lines(path: str) -> list[str]:
    """The file's lines outside fenced code blocks, with inline code removed: where a Markdown link can be."""
    lines, in_fence = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if FENCE.match(line):
                in_fence = not in_fence
            elif not in_fence:
                lines.append(INLINE_CODE.sub("", line))
    return lines


def marked_commands(path: str) -> list[str]:
    """The commands of each code block marked for this test (see the module docstring), continuations joined."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    commands = []
    for i, line in enumerate(lines):
        if line.strip() != RUN_MARKER:
            continue
        assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), (
            f"{os.path.relpath(path, REPO)}:{i + 1}: the run marker must be followed directly by a code block")
        pending = ""
        for body_line in lines[i + 2:]:
            if FENCE.match(body_line):
                break
            if body_line.rstrip().endswith("\\"):
                pending += body_line.rstrip()[:-1] + " "
                continue
            command = (pending + body_line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


MARKED = [(os.path.relpath(path, REPO), command) for path in doc_files() for command in marked_commands(path)]


def test_the_site_builds_in_strict_mode(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip('mkdocs or mkdocs-material is not installed: pip install -e ".[docs]" (the README test command '
                    "installs it)")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", os.path.join(REPO, "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert (tmp_path / "site" / "index.html").exists()


def test_the_readme_is_a_front_door_whose_test_command_installs_the_docs():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; keep it a front door of at most {MAX_README_LINES} and move the rest "
        "into a docs/ page")
    ci_command = next((line for line in lines if CI_TEST_COMMAND.match(line)), None)
    assert ci_command is not None, "README.md has no line `python3 -m venv ... pytest ...` for .ci/run to run"
    assert re.search(r'pip install -e "\.\[[^\]]*\bdocs\b[^\]]*\]"', ci_command), (
        f"the README's test command must install the docs extra, or the site test skips in CI: {ci_command}")


@pytest.mark.parametrize("path", doc_files(), ids=lambda path: os.path.relpath(path, REPO))
def test_every_relative_link_points_to_an_existing_file(path):
    missing = []
    for line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor on the same page: mkdocs --strict checks anchors
            file_part = target.split("#", 1)[0]
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), file_part))):
                missing.append(target)
    assert not missing, f"{os.path.relpath(path, REPO)} links to files that do not exist: {missing}"


def test_some_commands_are_marked_to_run():
    assert len(MARKED) >= 3, f"only {len(MARKED)} commands are marked with {RUN_MARKER!r}: the marker may be misspelt"


@pytest.mark.parametrize("page,command", MARKED, ids=[f"{page}: {command[:60]}" for page, command in MARKED])
def test_a_marked_command_runs(page, command):
    # `python` in a command is this interpreter, also when the virtual environment is not activated.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    output = result.stdout + result.stderr
    if command.split()[-1] == "--help" and result.returncode == 1:  # absl prints the flags, then exits 1
        assert "--helpfull" in output, f"{page}: `{command}` exited 1 without printing its flags:\n{output[-3000:]}"
    else:
        assert result.returncode == 0, f"{page}: `{command}` exited {result.returncode}:\n{output[-3000:]}"
