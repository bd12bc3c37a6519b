"""fluxnb.base.hub_errors: hub failures anywhere in an exception chain become one what-to-do message."""

from __future__ import annotations

import pytest
from hub_fakes import hub_error
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from fluxnb.base.errors import FluxnbError
from fluxnb.base.hub_errors import HubAccessError, friendly_load, hub_errors


def _wrapped(cause):
    """What transformers/diffusers do: raise their own OSError from the hub's error."""
    def load():
        try:
            raise cause
        except Exception as err:
            raise OSError("Cannot load model: see the root cause above") from err
    return load


def test_gated_repo_says_accept_the_licence_and_log_in():
    with pytest.raises(HubAccessError) as err:
        friendly_load(_wrapped(hub_error(GatedRepoError)), "black-forest-labs/FLUX.1-dev")
    msg = str(err.value)
    assert "gated" in msg and "https://huggingface.co/black-forest-labs/FLUX.1-dev" in msg
    assert "notebook_login()" in msg and "hf auth login" in msg
    assert isinstance(err.value, FluxnbError)


def test_not_found_and_offline():
    with pytest.raises(HubAccessError, match="not found on the Hub, or it is private"):
        friendly_load(_wrapped(hub_error(RepositoryNotFoundError)), "someone/typo")
    with pytest.raises(HubAccessError, match="https://huggingface.co/datasets/someone/data"):
        with hub_errors("someone/data", "dataset"):
            raise hub_error(RepositoryNotFoundError)
    with pytest.raises(HubAccessError, match="Hub cannot be reached"):
        friendly_load(_wrapped(LocalEntryNotFoundError("not cached")), "black-forest-labs/FLUX.1-dev")


def test_other_errors_pass_through_unchanged():
    with pytest.raises(ZeroDivisionError):
        friendly_load(lambda: 1 / 0, "x/y")
    assert friendly_load(lambda: 42, "x/y") == 42
