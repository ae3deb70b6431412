"""The docs cite the thesis adl implements exactly as it is titled, and link nowhere outside the repo's own pages."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = ("A. O. Dremov. *Using Internal Representations of Frozen Transformer Models to Solve Downstream Tasks*. "
            "Bachelor's thesis, Moscow Institute of Physics and Technology (MIPT), 2024.")


def flat(path: Path) -> str:
    """The page's text with blockquote markers and line breaks folded into single spaces."""
    return " ".join(line.lstrip("> ").strip() for line in path.read_text().splitlines())


def test_readme_and_method_cite_the_thesis_by_its_title():
    for page in (ROOT / "README.md", ROOT / "docs" / "method.md"):
        text = flat(page)
        assert CITATION in text, page
        assert "AdaLayers: adaptive selection" not in text, page


def test_docs_do_not_link_to_the_shared_notes():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert not re.search(r"\]\([^)]*shared/", page.read_text()), page
