"""The optimizers of the user-loop worker, importable by the test's one-process reference."""

import torch

from leantune.optim import LOMO, AdaLomo, InBackward

OPTIMIZERS = {
    "adalomo": lambda m: AdaLomo(m, lr=0.05),
    "lomo-clip": lambda m: LOMO(m, lr=0.05, clip_grad_norm=0.5),
    "adamw-in-backward": lambda m: InBackward(torch.optim.AdamW, m, lr=1e-2, weight_decay=0.1),
}
