"""The README documents every setting a user can set."""

from dataclasses import fields

from pipelines.settings import PROJECT_ROOT, Settings


def test_every_setting_is_in_the_readme():
    readme = (PROJECT_ROOT / "README.md").read_text()
    missing = [f"PERPFOLIO_{f.name.upper()}" for f in fields(Settings) if f"`PERPFOLIO_{f.name.upper()}`" not in readme]
    assert missing == []
