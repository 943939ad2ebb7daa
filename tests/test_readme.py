"""The README stays true: its option tables come from the schema, its commands exist, every magic is in it."""

from __future__ import annotations

import re
from pathlib import Path

from nbllm.loaders import option_loaders
from nbllm.options import GenerationOptions, LoadOptions, markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _between(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n(.*?)\n<!-- /{marker} -->", README, re.S)
    assert match, marker
    return match.group(1)


def test_option_tables_are_the_schemas():
    assert _between("load-options-table") == markdown_table(LoadOptions, option_loaders)
    assert _between("generation-options-table") == markdown_table(GenerationOptions)


def test_presets_table_is_the_librarys():
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in _between("presets-table").splitlines()]
    header, table = rows[0], rows[2:]
    from nbllm.presets import BUILTIN

    presets = {name: values for name, values in GenerationOptions.presets().items() if name in BUILTIN}
    assert [r[0] for r in table] == list(presets)
    for name, *values in table:
        assert dict(zip(header[1:], map(float, values))) == presets[name], name


def test_setup_commands_exist_and_ci_runs_the_test_command():
    makefile = (ROOT / "Makefile").read_text()
    for command in ("make quickstart", "make test"):
        assert command in README
        assert re.search(rf"^{command.split()[1]}:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_magic_is_documented(shell):
    magics = shell.magics_manager.lsmagic()
    ours = sorted(name for kind in ("line", "cell") for name in magics[kind] if name.startswith("llm"))
    assert len(ours) >= 10
    for name in ours:
        assert f"%{name}" in README, name
