"""The real offline assets (MiniLM, WNUT-16, tweets) come from PyPI packages. A test that needs
one is skipped where the package is missing, except under `make test` (ADL_REQUIRE_ASSETS=1),
which installs them: there a missing asset is a failure, never a silent skip."""

import importlib.util
import os

import pytest


def missing(package: str) -> bool:
    if importlib.util.find_spec(package) is not None:
        return False
    if os.environ.get("ADL_REQUIRE_ASSETS"):
        raise RuntimeError(f"{package} is not installed but ADL_REQUIRE_ASSETS is set: run `make install`")
    return True


def needs(package: str):
    """A skip mark for tests that need ``package`` (an error under ADL_REQUIRE_ASSETS)."""
    return pytest.mark.skipif(missing(package), reason=f"{package} not installed")
