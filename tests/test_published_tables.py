"""Every table of results in README.md and docs/ is what benchmarks.report renders from the committed JSON.

A hand edit of one number, a stale table after a rerun, or a result table typed outside a rendered block fails here.
Tables that are not results (a config reference) are preceded by ``<!-- reference table -->``.
"""

from __future__ import annotations

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
