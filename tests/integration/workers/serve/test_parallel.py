"""Tensor parallel without a server: rank 0's runner calls, repeated by a follower over gloo, give whole logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stratus_workers.ports import free_port

pytestmark = pytest.mark.integration

RANK = r"""
import json
import os
import sys

import torch

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.serve import parallel
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import FusedRunner

torch.set_num_threads(1)
ctx = parallel.init_group(2)
model = random_llama(dict(TINY), vocab_size=512, init_std=0.2, seed=1)
if ctx.rank == 0:
    reference_model = random_llama(dict(TINY), vocab_size=512, init_std=0.2, seed=1)  # sharding trims `model`
    whole = build_runner(reference_model, max_rows=3, max_len=32, fast=True)
    sharded = build_runner(model, max_rows=3, max_len=32, parallel=ctx)  # the followers build theirs too
    assert isinstance(sharded, FusedRunner) and sharded.local_heads == whole.num_heads // 2
    calls = [
        ("forward", (0, [[5, 6, 7], [3, 4]]), {}),  # prefill
        ("forward", (0, [[8], [9]]), {}),  # a decode step
        ("forward", (2, [[1, 2, 3, 4]]), {"all_logits": True}),  # a session row above the batch
        ("truncate", (1, 2), {}),
        ("move", (1, 0), {}),
        ("reset", (1,), {}),
        ("forward", (0, [[10]]), {}),
        ("truncate", (2, 3), {}),
        ("forward", (2, [[7, 7]]), {"all_logits": True}),
    ]
    gaps = []
    for name, args, kwargs in calls:
        expected, got = (getattr(r, name)(*args, **kwargs) for r in (whole, sharded))
        if name == "forward":
            gaps.append(float((expected - got).abs().max()))
    sharded.close()  # the follower leaves follow()
    print(json.dumps({"gaps": gaps, "lengths": [whole.lengths, sharded.lengths]}))
else:
    parallel.follow(ctx, lambda **settings: build_runner(model, parallel=ctx, **settings))
    print(json.dumps({"followed": True}))
# As the server's entrypoint ends a rank: a process group torn down at interpreter exit can abort.
sys.stdout.flush()
os._exit(0)
"""


def test_a_follower_repeats_rank_zeros_calls_and_the_shards_add_up() -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE
        )
        for r in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=180)[0] for proc in ranks]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in ranks] == [0, 0]
    leader, follower = (json.loads(out.decode().strip().splitlines()[-1]) for out in outputs)
    assert follower == {"followed": True}
    assert len(leader["gaps"]) == 5 and max(leader["gaps"]) < 1e-4
    whole, sharded = leader["lengths"]
    assert whole == sharded == [3, 0, 5]
