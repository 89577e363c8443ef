"""The private Lightning API that surgery inside fit relies on (lit_surgery.lightning.compat):
an upgrade that changes it fails here, naming what changed."""

import tomllib
from pathlib import Path

import lightning
from packaging.specifiers import SpecifierSet

from lit_surgery.lightning import compat

ROOT = Path(__file__).resolve().parents[1]


def test_the_private_api_is_all_there():
    assert compat.missing() == [], (
        f"lightning {lightning.__version__} changed private API that lit_surgery uses: "
        f"{compat.missing()}; see lit_surgery/lightning/compat.py"
    )


def test_the_installed_lightning_is_in_the_tested_range_that_pyproject_admits():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d.removeprefix("lightning") for d in deps if d.startswith("lightning>")]
    assert SpecifierSet(spec) == SpecifierSet(compat.TESTED)
    assert lightning.__version__ in SpecifierSet(compat.TESTED)
