"""Shared fixtures. The offline/headless environment itself is set in the root conftest.py."""

import pytest

from fluxnb.tiny.flux import TinyAssets, ensure_tiny


@pytest.fixture(scope="session")
def tiny_assets() -> TinyAssets:
    """The tiny FLUX.1-dev stand-in and its dataset, built once per session in $FLUXNB_TINY_DIR.

    The notebooks that nbval runs afterwards find it there too. Treat it as read-only.
    """
    return ensure_tiny()
