"""The worker integration tests run models in-process beside their servers: one intra-op thread each."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
