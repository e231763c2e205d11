"""The front door and the manuals: every relative link resolves, and the README stays short."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "results/README.md", "benchmarks/README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def relative_links(page):
    return [link for link in LINK.findall((ROOT / page).read_text()) if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    missing = [link for link in relative_links(page) if not (ROOT / page).parent.joinpath(link).exists()]
    assert missing == [], f"{page}: links to missing files {missing}"


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 260 and max(map(len, lines)) <= 150
    assert "./run.sh" in lines and "./run.sh test" in lines  # the two commands, each on its own line
    manuals = set(relative_links("README.md"))
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= manuals  # every manual is reachable


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) and [gone](nowhere.md) and [web](https://example.org/x.md)\n")
    links = [link for link in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", link)]
    assert links == ["page.md", "nowhere.md"]
