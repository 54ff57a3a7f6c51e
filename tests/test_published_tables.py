"""Every table of results in README.md and docs/ is what benchmarks.report renders from the committed JSON.

A hand edit of one number, a stale table after a rerun, or a result table typed outside a rendered block fails here.
Tables that are not results (a config reference) are preceded by ``<!-- reference table -->``.
"""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import report

PAGES = report.pages()


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_rendered_blocks_match_their_records(page):
    text = page.read_text()
    assert report.render_page(text) == text, f"run `python -m benchmarks.report` and commit {page.name}"


def test_every_renderer_is_published_somewhere():
    shown = {match["name"] for page in PAGES for match in report.BLOCK.finditer(page.read_text())}
    assert shown == set(report.PUBLISHED)


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_no_table_outside_a_rendered_block(page):
    outside = report.BLOCK.sub("", page.read_text())
    starts = re.findall(r"(?:^|\n)([^\n]*)\n\|[^\n]*\n\|---", outside)
    assert all(line == "<!-- reference table -->" for line in starts), starts


def test_one_number_edited_by_hand_is_caught():
    text = (report.ROOT / "README.md").read_text()
    block = next(report.BLOCK.finditer(text))
    body = block["body"]
    edited_body = re.sub(r"\d+\.\d", lambda m: m[0][:-1] + str((int(m[0][-1]) + 1) % 10), body, count=1)
    edited = text.replace(body, edited_body)
    assert edited != text and report.render_page(edited) == text


RESULTS = report.RESULTS


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.json")), ids=lambda p: str(p.relative_to(RESULTS)))
def test_records_name_the_asset_directory_not_a_developers_path(path):
    text = [s for s in _strings(json.loads(path.read_text())) if "datasets/" in s or "models/" in s]
    personal = [s for s in text if re.search(r"(^|[\s=])(/root|/home|/work|/Users|~)/", s)]
    assert not personal, f"{path.name}: {personal[0][:200]} (write the asset directory as $RESIDUAL_ASSETS)"


def test_recorded_commands_write_the_asset_directory_as_the_variable(monkeypatch, tmp_path):
    from benchmarks import presets

    monkeypatch.setattr(presets, "ASSETS", str(tmp_path / "assets"))
    argv = ["--model", f"{tmp_path}/assets/models/m", "--methods", "residual*", "--out", "/tmp/x"]
    command = presets.recorded_command("benchmarks.run", argv)
    assert command == "python -m benchmarks.run --model $RESIDUAL_ASSETS/models/m --methods 'residual*' --out /tmp/x"
    assert presets.portable({"a": [f"{tmp_path}/assets/datasets/d"]}) == {"a": ["$RESIDUAL_ASSETS/datasets/d"]}
