"""fluxnb.base.hub_errors: hub failures anywhere in an exception chain become one what-to-do message."""

from __future__ import annotations

from types import SimpleNamespace

import httpx2
import pytest
from hub_fakes import hub_error
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from fluxnb.base import hub_errors as hub_errors_module
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


@pytest.fixture
def network(monkeypatch, tmp_path):
    """huggingface_hub online, its HTTP client answered by `network.answer(request)` (raise to drop the request);
    every request and every backoff sleep is recorded, and nothing waits."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    state = SimpleNamespace(requests=[], sleeps=[], answer=None)

    def handle(request):
        state.requests.append(f"{request.method} {request.url}")
        return state.answer(request)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_http.time, "sleep", state.sleeps.append)  # huggingface_hub's backoff, not waited here
    monkeypatch.setattr(hub_errors_module, "_probed", {}, raising=False)  # a fresh probe per test
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handle), follow_redirects=True,
                                                   event_hooks={"request": [_http.hf_request_event_hook]}))
    yield state
    _http.set_client_factory(_http.default_client_factory)


def _download(tmp_path):
    from huggingface_hub import hf_hub_download

    repo = "black-forest-labs/FLUX.1-dev"
    return friendly_load(lambda: hf_hub_download(repo, "model_index.json", cache_dir=tmp_path), repo)


def test_no_network_fails_at_once_with_the_message_not_after_retries(network, tmp_path, caplog):
    """Issue 26.6: huggingface_hub retried each file 5 times (1+2+4+8+8 s) before this message."""
    def no_dns(request):
        raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)

    network.answer = no_dns
    with pytest.raises(HubAccessError, match="not in the local Hugging Face cache and the Hub cannot be reached"):
        _download(tmp_path)
    assert network.sleeps == [] and "Retrying in" not in caplog.text
    assert len(network.requests) == 1, network.requests  # one probe, then offline mode: no request at all


def test_a_reachable_hub_is_asked_as_usual(network, tmp_path):
    """The probe's answer (any status) keeps huggingface_hub online: a missing repo is reported as missing."""
    network.answer = lambda request: httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, request=request)
    with pytest.raises(HubAccessError, match="was not found on the Hub"):
        _download(tmp_path)
    assert network.sleeps == [] and any("model_index.json" in r for r in network.requests)  # asked, not offline


def test_no_network_a_hub_dataset_fails_at_once_too(network, monkeypatch, tmp_path):
    import datasets

    from fluxnb.config import DataConfig
    from fluxnb.data.sources import load_hub

    def no_dns(request):
        raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)

    network.answer = no_dns
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # datasets' own copy of the setting
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(FluxnbError, match="Could not load the Hub dataset 'someone/pictures'"):
        load_hub("someone/pictures", DataConfig(dataset="someone/pictures"))
    assert network.sleeps == [] and len(network.requests) == 1, network.requests
