"""Test helper: the tiny transformer with a LoRA that matters, one loss on fixed random inputs, its gradients.

Shared by the tests of fluxnb.model.offload and fluxnb.train.speed, which compare a changed step against the plain one, and
(`denoise`) by the merge tests, which compare one denoising call of a fused model with the unfused one.
"""

import torch

from fluxnb.config import LoRAConfig, ModelConfig
from fluxnb.run.hardware import Hardware
from fluxnb.model import lora, quant

HW = Hardware("tiny", torch.device("cpu"), torch.float32, None, "test")


def model(model_id, double_quant=False, quantization="nf4", dropout=0.0):
    config = ModelConfig(model_id=model_id, double_quant=double_quant, quantization=quantization)
    transformer = quant.load_transformer(config, HW)
    lora.add_lora(transformer, LoRAConfig(rank=4, alpha=4.0, targets="all-linear", dropout=dropout), seed=0)
    with torch.no_grad():  # B starts at zero; make the adapter matter so its gradients reach every block
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    transformer.enable_gradient_checkpointing()
    return transformer.train()


def loss(transformer, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    pred = transformer(hidden_states=torch.randn(batch, 24, 64, generator=g), timestep=torch.full((batch,), 0.5),
                       guidance=torch.ones(batch), pooled_projections=torch.randn(batch, 32, generator=g),
                       encoder_hidden_states=torch.randn(batch, 7, 32, generator=g), txt_ids=torch.zeros(7, 3),
                       img_ids=torch.randn(24, 3, generator=g), return_dict=False)[0]
    return (pred - torch.randn(pred.shape, generator=g)).pow(2).mean()


def grads(transformer):
    return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}


@torch.no_grad()
def denoise(transformer, timestep: float) -> torch.Tensor:
    """One denoising call of the tiny transformer on fixed inputs (6 x 4 latent patches, 8 text tokens)."""
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 24, 64, generator=g),
              "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
              "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([timestep]),
              "img_ids": torch.randn(24, 3, generator=g), "txt_ids": torch.zeros(8, 3), "guidance": torch.tensor([3.5])}
    return transformer(**inputs, return_dict=False)[0]
