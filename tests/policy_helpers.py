"""Shared builders for the pi0 / pi0.5 / ACoT policy tests."""

import torch

from vla_blocks.model import create_model


def build(name, seed=0, perturb=True, **overrides):
    """A tiny policy; ``perturb`` wakes the zero-initialised adaRMS layers so time conditioning matters."""
    torch.manual_seed(seed)
    m = create_model(name, **overrides)
    if perturb:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def fixed_batch(model, B=2, seed=1, times=(0.3, 0.85)):
    """A demo batch with text padding in row 0, a missing first camera in row 1, and fixed noise and times."""
    g = torch.Generator().manual_seed(seed)
    batch = model.demo_batch(B, g)
    c = model.config
    batch["tokenized_prompt_mask"][0, 3:] = False
    batch["image_masks"][1, 0] = False
    batch["noise"] = torch.randn(B, c.action_horizon, c.action_dim, generator=g)
    if getattr(c, "ear", None) is not None:
        batch["coarse_noise"] = torch.randn(B, c.ear.horizon, c.action_dim, generator=g)
    batch["time"] = torch.tensor(times)[:B]
    # as the model sees it (vla_blocks.batch): masked cameras and prompt padding zeroed, so hand-written
    # references that read invalid positions (ACoT's IAR without mask_padding) see the same inputs
    return model.check_batch(batch, "train")
