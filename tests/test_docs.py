"""The documentation covers what a user meets: every setting, every table, every reference page."""

import re
from dataclasses import fields

from assets import schemas
from pipelines.settings import PROJECT_ROOT, Settings

DOCS = PROJECT_ROOT / "docs"
REFERENCE_PAGES = ("computation.md", "configuration.md", "real-data.md", "report.md", "operations.md", "testing.md")


def tables() -> list[str]:
    """Every warehouse table, by the `schema.table:` its pandera model's docstring starts with."""
    models = [m for m in vars(schemas).values() if isinstance(m, type) and issubclass(m, schemas.Table) and m is not schemas.Table]
    names = [re.match(r"\s*([a-z_]+\.[a-z_]+):", m.__doc__ or "") for m in models]
    assert all(names), [m.__name__ for m, n in zip(models, names) if not n]
    return sorted(n.group(1) for n in names)


def test_every_setting_is_in_the_configuration_page():
    page = (DOCS / "configuration.md").read_text()
    missing = [f"PERPFOLIO_{f.name.upper()}" for f in fields(Settings) if f"`PERPFOLIO_{f.name.upper()}`" not in page]
    assert missing == []


def test_every_table_and_the_long_view_are_in_the_computation_page():
    page = (DOCS / "computation.md").read_text()
    found = tables()
    assert len(found) >= 27
    missing = [name for name in found + [schemas.ESTIMATES_LONG_VIEW] if f"`{name}`" not in page]
    assert missing == []


def test_the_readme_is_short_and_links_every_reference_page():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make run" in readme and "make test" in readme
    for page in REFERENCE_PAGES:
        assert (DOCS / page).exists() and f"](docs/{page})" in readme, page


def test_links_between_pages_resolve():
    """Every relative markdown link of the README and the reference pages names a file that exists
    and, with an anchor, a heading of that file."""
    def anchors(path):
        return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"(?m)^#+ (.+)$", path.read_text())}

    broken = []
    for source in [PROJECT_ROOT / "README.md"] + [DOCS / p for p in REFERENCE_PAGES]:
        for target in re.findall(r"\]\(([^)]+)\)", source.read_text()):
            if target.startswith("http"):
                continue
            file, _, anchor = target.partition("#")
            path = (source.parent / file).resolve() if file else source
            if not path.exists() or (anchor and anchor not in anchors(path)):
                broken.append(f"{source.name}: {target}")
    assert broken == []
