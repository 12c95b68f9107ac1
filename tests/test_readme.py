"""The README is part of the product: its commands, its measures table and every Python snippet are checked."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import repsim_plugin as rp

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert [line.split()[0:2] for line in first_block] == [["make", "demo"], ["make", "test"]]
    assert README.index("make demo") < README.index("## ")  # before any section
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_measures_table_matches_the_registry():
    match = re.search(r"<!-- measures-table:[^>]*-->\n(.*?)<!-- /measures-table -->", README, flags=re.S)
    assert match, "the measures table markers are missing"
    assert match.group(1).strip() == rp.measures.measures_table_markdown().strip()


def test_there_are_snippets():
    assert len(python_blocks()) >= 6


@pytest.mark.slow
def test_every_python_snippet_runs(tmp_path):
    """All snippets run in one fresh interpreter (each in its own namespace), in a scratch folder."""
    runner = textwrap.dedent(
        """
        import sys, traceback, warnings
        warnings.simplefilter("ignore")
        blocks = {blocks!r}
        failures = []
        for i, code in enumerate(blocks):
            try:
                exec(compile(code, f"README block {{i}}", "exec"), {{"__name__": "__readme__"}})
            except BaseException:
                failures.append(f"--- block {{i}} ---\\n{{code}}\\n{{traceback.format_exc()}}")
        print("\\n".join(failures))
        sys.exit(1 if failures else 0)
        """
    ).format(blocks=python_blocks())
    proc = subprocess.run([sys.executable, "-c", runner], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
