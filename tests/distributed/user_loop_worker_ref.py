"""The optimizers of the user-loop worker, importable by the test's one-process reference."""

import torch

from leantune.optim import LOMO, AdaLomo, InBackward

# LOMO without clipping is SGD: its update scales with the gradient, so a gradient summed over
# the ranks instead of averaged shows in the weights (AdaLomo's and clipped LOMO's would not).
LOMO_LR = 0.5

OPTIMIZERS = {
    "adalomo": lambda m: AdaLomo(m, lr=0.05),
    "lomo-clip": lambda m: LOMO(m, lr=0.05, clip_grad_norm=0.5),
    "adamw-in-backward": lambda m: InBackward(torch.optim.AdamW, m, lr=1e-2, weight_decay=0.1),
}
