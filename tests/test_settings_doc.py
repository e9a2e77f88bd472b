"""docs/settings.md (and README's marked table, once it has one) are generated from BAdamConfig's fields:
these tests fail when a page is stale, a key has no help, or the generator loses a key."""

from pathlib import Path

import pytest

from badam_hf.core.config import BAdamConfig, help_text
from badam_hf.tools import settings_doc

ROOT = Path(__file__).resolve().parent.parent
STALE = "run `python -m badam_hf.tools.settings_doc --write docs/settings.md README.md`"


def test_docs_settings_md_holds_both_generated_blocks_up_to_date():
    text = (ROOT / "docs" / "settings.md").read_text()
    assert text.split("\n\n")[1].startswith("**Who this is for:**")  # right under the title
    blocks = settings_doc.blocks_in(text)
    assert set(blocks) == {"settings-all", "settings"}
    for name, body in blocks.items():
        assert body == settings_doc.render(name), f"docs/settings.md block {name!r} is stale; {STALE}"


def test_readme_marked_table_is_up_to_date():
    readme = ROOT / "README.md"
    blocks = settings_doc.blocks_in(readme.read_text()) if readme.exists() else {}
    if not blocks:
        pytest.skip("README.md has no <!-- settings:begin --> markers yet")
    for name, body in blocks.items():
        assert body == settings_doc.render(name), f"README.md block {name!r} is stale; {STALE}"


def test_every_key_has_help_and_a_row_with_its_default():
    table = settings_doc.full_tables()
    for key, _, f, _ in BAdamConfig.flat_settings():
        assert help_text(f), f"field {key!r} has no metadata['help']"
        rows = [line for line in table.splitlines() if line.startswith(f"| `{key}` |")]
        assert len(rows) == 1, key
        assert f"| {settings_doc.format_default(f)} |" in rows[0]
    for f in BAdamConfig.__dataclass_fields__.values():  # the section fields too
        assert help_text(f), f.name


def test_rows_show_types_choices_and_defaults_as_written_in_optim_args():
    rows = {line.split(" | ")[0]: line for line in settings_doc.full_tables().splitlines() if line.startswith("| `")}
    assert rows["| `switch_mode`"].startswith(
        "| `switch_mode` | `random` \\| `ascending` \\| `descending` \\| `fixed` | `random` |")
    assert "| true or false | `false` |" in rows["| `include_lm_head`"]
    assert "| integer or `none` | unset |" in rows["| `switch_every`"]
    assert "| number | `0.05` |" in rows["| `update_ratio`"]
    short = settings_doc.short_table().splitlines()
    keys = [line.split("`")[1] for line in short[2:]]
    assert 6 <= len(keys) <= 12 and {"mode", "switch_every", "switch_mode", "granularity"} <= set(keys)


def test_refresh_fills_markers_and_check_reports_stale_files(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n\n<!-- settings:begin -->\nold table\n<!-- settings:end -->\n\noutro\n")
    assert settings_doc.stale_blocks(page.read_text()) == ["settings"]
    assert settings_doc.main(["--check", str(page)]) == 1
    assert settings_doc.main(["--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("intro\n\n<!-- settings:begin -->\n")
    assert text.endswith("<!-- settings:end -->\n\noutro\n")
    assert "old table" not in text and "| `switch_every` |" in text
    assert settings_doc.main(["--check", str(page)]) == 0
    assert settings_doc.refresh(text) == text
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    assert settings_doc.main(["--write", str(bare)]) == 1 and bare.read_text() == "no markers\n"
