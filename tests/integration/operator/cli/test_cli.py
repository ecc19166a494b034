"""The `stratus` commands as a user runs them: real processes against real servers on loopback."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[4]


async def stratus(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stratus_operator.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_chat_bench_and_calibrate(
    model_server, draft_model_dir, tiny_model_dir, router_config, running_router, tmp_path: Path
) -> None:
    async with (
        model_server(tier="cloud", name="cloud") as cloud,
        model_server(tier="edge", name="edge", model=str(draft_model_dir)) as edge,
    ):
        config = router_config(
            "cascade",
            [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")],
            cascade={"confidenceThreshold": -100.0},
        )
        config = config.model_copy(update={"tokenizer": str(tiny_model_dir)})
        async with running_router(config) as router:
            code, out, err = await stratus("chat", "--target", router.address, "--max-new-tokens", "8", "Hello")
            assert code == 0, err
            assert "[edge · confident · 8 tokens · length" in err and out  # random weights: any text
            # Every policy the router takes, the CLI takes (speculative was once refused by the client).
            code, out, err = await stratus(
                "chat", "--target", router.address, "--max-new-tokens", "8", "--policy", "speculative", "Hello"
            )
            assert code == 0, err
            assert "[cloud · speculative · 8 tokens · length" in err

            code, out, err = await stratus(
                "bench", "--target", router.address, "--concurrency", "3", "--requests", "6", "--max-new-tokens", "4"
            )
            assert code == 0, out + err
            assert "edge 100%" in out and "p50" in out

            manifest = tmp_path / "smollm2.yaml"
            manifest.write_text((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
            code, out, err = await stratus(
                "calibrate",
                "--target",
                router.address,
                "--retention",
                "0.9",
                "--max-new-tokens",
                "6",
                "-f",
                str(manifest),
                "--write",
            )
            assert code == 0, out + err
            assert "← chosen" in out and "wrote" in out
        written = yaml.safe_load(manifest.read_text())["spec"]["routing"]["cascade"]["confidenceThreshold"]
        chosen = float(next(line for line in out.splitlines() if line.startswith("confidenceThreshold:")).split()[1])
        assert written == pytest.approx(chosen, abs=1e-4) and written <= 0.0
        assert "# The main sample" in manifest.read_text()  # comments survive


async def test_chat_reports_unreachable_target() -> None:
    code, _, err = await stratus("chat", "--target", "127.0.0.1:1", "--timeout", "2", "hi")
    assert code == 1 and "error: UNAVAILABLE" in err
