"""The README states what the code does: its corpora table is the registry's."""

from __future__ import annotations

from pathlib import Path

from aero_lightning.data.corpora import corpora_markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_corpora_table_is_the_registry():
    assert corpora_markdown_table().strip() in README.read_text(encoding="utf-8")
