"""The README is the front door: its terms are defined before they are used, its snippets do what they say, and its
headline claims say what was measured."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TERMS = ["**unit**", "**basis**", "**k**", "**λ**", "*ResiDual*", "*ResiDual\\**", "*coarse*", "**head**",
         "*zero-shot*", "*centroids*", "**readout**"]  # fmt: skip


def test_the_terms_are_defined_before_the_first_section():
    intro = README[: README.index("\n## ")]
    missing = [term for term in TERMS if term not in intro]
    assert not missing, f"define {missing} near the top of README.md"


def test_no_snippet_saves_under_a_literal_tilde():
    """``save_pretrained`` and ``save_to_disk`` do not expand ``~``: a path built from one must go through
    ``os.path.expanduser`` (or ``Path.expanduser``)."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)\n```", page.read_text(), re.DOTALL):
            for line in block.splitlines():
                if re.search(r"""["']~/""", line):
                    assert "expanduser" in line, f"{page.name}: {line.strip()}"


def test_the_scale_claim_says_which_rows_ran_the_backbone():
    sentence = next(p for p in README.split("\n\n") if "300,000" in p)
    assert "synthetic" in sentence and "random CLIP" in sentence, sentence
