"""The worker unit tests run models in-process: one intra-op thread each (two cores are shared by everything)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
