"""Hub failures as transformers/diffusers raise them, without a network (their errors want an HTTP response)."""

from huggingface_hub.errors import GatedRepoError


def hub_error(cls, text: str = "hub said no") -> Exception:
    err = cls.__new__(cls)  # skip the constructor that needs an HTTP response; the message is all we need
    Exception.__init__(err, text)
    return err


def gated_load(*args, **kwargs):
    """A stand-in for from_pretrained on FLUX.1-dev without access: an OSError raised from GatedRepoError."""
    cause = hub_error(GatedRepoError, "401 Client Error: access to model black-forest-labs/FLUX.1-dev is restricted")
    raise OSError("You are trying to access a gated repo.") from cause
