"""Every relative link in the README and docs/ points at a file and heading that exist.

The README's comparison table and the docs link to measured tables by heading anchor;
renaming a heading (or adding a date to it) would silently break them. Anchors follow
GitHub's rule: lower case, punctuation dropped, spaces to hyphens, repeats numbered.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen, in_code = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else re.match(r"#{1,6}\s+(.*)$", line)
        if match:
            slug = github_anchor(match.group(1))
            n = seen.get(slug, 0)
            found.add(slug if n == 0 else f"{slug}-{n}")
            seen[slug] = n + 1
    return found


def test_anchor_rule():
    assert github_anchor("4. Latent diffusion from an image folder") == (
        "4-latent-diffusion-from-an-image-folder"
    )
    assert github_anchor("Knobs (`train/configs/distill_digits.py`)") == (
        "knobs-trainconfigsdistill_digitspy"
    )


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with that anchor in {dest.name})")
    assert not broken, f"{page.name} has broken links: " + "; ".join(broken)


def test_no_file_names_a_developer_machine():
    """Docs, notebooks, scripts and code name paths a user has, never the developers'."""
    private = re.compile("/" + "work/|" + r"\.\./shared")
    offenders = []
    for folder in ("jaxdiff", "train", "sample", "tests", "benchmarks", "docs", "colab", ".ci"):
        for path in sorted((ROOT / folder).rglob("*")):
            if (
                path.suffix in {".py", ".md", ".ipynb", ".sh", ".cfg", ".toml", ""}
                and path.is_file()
            ):
                if private.search(path.read_text(errors="ignore")):
                    offenders.append(str(path.relative_to(ROOT)))
    for path in ROOT.glob("*.md"):
        if private.search(path.read_text()):
            offenders.append(path.name)
    assert not offenders, f"paths from the developers' machines in: {offenders}"
