"""`stratus calibrate`: measure edge confidence against cloud answers and set the cascade threshold."""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from stratus_operator.cli.common import add_connection_args
from stratus_workers.client import AsyncClient
from stratus_workers.client.prompts import CALIBRATION_PROMPTS
from stratus_workers.router.calibration import Calibration, Sample, choose_threshold, likelihood_quality
from stratus_workers.router.config import CascadeSettings
from stratus_workers.router.policy import edge_confidence, mean_logprob


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="pick the cascade confidence threshold that keeps quality at a target",
        description="Ask the edge (with log-probabilities) and the cloud each calibration prompt through a "
        "router, then choose the threshold that serves the most prompts at the edge while quality retention "
        "(the cloud's likelihood of the edge's answers relative to its own) stays at or above --retention.",
    )
    add_connection_args(parser)
    parser.add_argument("--retention", type=float, default=0.97, help="quality retention to keep (0-1]")
    parser.add_argument("--prompts", type=Path, help="one prompt per line (default: the built-in calibration set)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("-f", "--file", type=Path, help="an LLMDeployment manifest to write the threshold into")
    parser.add_argument("--write", action="store_true", help="update --file in place")
    parser.add_argument(
        "--probe-tokens",
        type=int,
        help="judge edge answers as a cascade with this probeTokens does (default: the manifest's, else 0)",
    )
    parser.add_argument(
        "--window-tokens",
        type=int,
        help="judge edge answers by the window rule with this windowTokens (default: the manifest's, else 0: "
        "the whole answer's mean)",
    )
    parser.add_argument(
        "--running-mean",
        action=argparse.BooleanOptionalAction,
        help="judge edge answers by the running-mean rule (default: the manifest's runningMean, else off)",
    )
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class JudgedAnswer:
    """The edge's answer to a calibration prompt, as the cascade sees it (its log-probabilities) and as the cloud
    judges it (`likelihood_quality`): what any cascade rule's calibration needs."""

    prompt: str
    logprobs: tuple[float, ...]
    quality: float


async def collect_answers(
    target: str, prompts: list[str], max_new_tokens: int, *, token: str | None = None, tls_ca: str | None = None
) -> list[JudgedAnswer]:
    """For each prompt: the edge's answer with its log-probabilities, and the cloud's judgement of that answer."""
    answers = []
    async with AsyncClient(target, timeout=600, token=token, tls_ca=tls_ca) as client:
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            edge = await client.generate(
                messages=messages, max_new_tokens=max_new_tokens, logprobs=True, policy="edge-only"
            )
            cloud = await client.generate(
                messages=messages, max_new_tokens=max_new_tokens, logprobs=True, policy="cloud-only"
            )
            # The cloud judges the edge's answer: its likelihood of it against that of its own answer.
            judged = await client.score(edge.text, messages=messages, tier="cloud")
            own = mean_logprob([lp.logprob for lp in cloud.logprobs])
            quality = likelihood_quality(judged.mean_logprob, own)
            answers.append(JudgedAnswer(prompt, tuple(lp.logprob for lp in edge.logprobs), quality))
    return answers


def samples_for(
    answers: Sequence[JudgedAnswer], probe_tokens: int = 0, window_tokens: int = 0, running_mean: bool = False
) -> list[Sample]:
    """The answers' calibration samples for one rule: each one's confidence as a cascade with `probe_tokens`,
    `window_tokens` and `running_mean` judges it."""
    return [
        Sample(a.prompt, edge_confidence(a.logprobs, probe_tokens, window_tokens, running_mean), a.quality)
        for a in answers
    ]


def manifest_cascade(path: Path) -> dict[str, Any]:
    """spec.routing.cascade of an LLMDeployment manifest ({} when it has none); a ValueError naming the file and
    the section when it cannot be read as one."""
    try:
        section: Any = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read the manifest {path}: {exc}") from None
    seen: list[str] = []
    for key in ("spec", "routing", "cascade", None):
        if not isinstance(section, dict):
            where = ".".join(seen) or "the manifest"
            raise ValueError(f"{where} in {path} is a {type(section).__name__}, not a mapping: give an LLMDeployment")
        if key is not None:
            section = section.get(key) or {}
            seen.append(key)
    cascade: dict[str, Any] = section
    return cascade


# The flags that set the rule over the manifest's: the cascade setting (its manifest name) each one gives.
RULE_FLAGS = {"probeTokens": "--probe-tokens", "windowTokens": "--window-tokens", "runningMean": "--running-mean"}


def cascade_rule(args: argparse.Namespace) -> CascadeSettings:
    """The rule to judge edge answers by: the manifest's spec.routing.cascade (-f), the flags given over it, read
    as the router reads its settings (`CascadeSettings`). A ValueError saying what is wrong and how to fix it
    when the router would refuse them."""
    flags: dict[str, Any] = {}
    for field, flag in RULE_FLAGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is None:
            continue
        if not isinstance(value, bool) and value < 0:
            raise ValueError(f"{flag} is {value}; use 0 (off) or more")
        flags[field] = value
    cascade = manifest_cascade(args.file) if args.file else {}
    cascade.pop("confidenceThreshold", None)  # what calibrating replaces: a wrong one is no reason to refuse
    try:
        return CascadeSettings.model_validate({**cascade, **flags})
    except ValidationError as exc:
        raise ValueError(rule_problems(exc, flags, args.file)) from None


def rule_problems(exc: ValidationError, flags: dict[str, Any], path: Path | None) -> str:
    """What the router refuses in the rule (`cascade_rule`'s), each problem blamed on the flag or the manifest
    line that gave it, with how to fix it."""
    lines = ["the cascade rule is not one the router accepts:"]
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        if field in flags:
            lines.append(f"  {RULE_FLAGS[field]} {error['input']}: {error['msg']}; give it a value the router accepts")
            continue
        fix = "fix it there" + (f" or give {RULE_FLAGS[field]}" if field in RULE_FLAGS else "")
        if error["type"] == "extra_forbidden":
            names = ", ".join(str(f.alias) for f in CascadeSettings.model_fields.values())
            fix = f"remove it or correct its name (the settings: {names})"
        lines.append(f"  spec.routing.cascade.{field}: {error['input']!r} in {path}: {error['msg']}; {fix}")
    return "\n".join(lines)


def write_threshold(path: Path, threshold: float) -> None:
    """Set spec.routing.cascade.confidenceThreshold in the manifest, keeping its comments where possible."""
    text = path.read_text()
    value = f"{threshold:.4f}"
    pattern = re.compile(r"^(\s*confidenceThreshold:\s*)([-+0-9.eE]+)\s*$", re.M)
    if len(pattern.findall(text)) == 1:
        path.write_text(pattern.sub(lambda m: m.group(1) + value, text))
        return
    manifest = yaml.safe_load(text)
    routing = manifest.setdefault("spec", {}).setdefault("routing", {})
    routing.setdefault("cascade", {})["confidenceThreshold"] = float(value)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def report(result: Calibration, samples: list[Sample]) -> None:
    table = Table(title=f"calibration: {len(samples)} prompts, retention target {result.target:.0%}")
    for column in ("threshold", "served at edge", "quality retention", ""):
        table.add_column(column, justify="right")
    for point in result.curve:
        mark = "← chosen" if point.threshold == result.threshold else ""
        table.add_row(f"{point.threshold:.3f}", f"{point.edge_share:.0%}", f"{point.retention:.1%}", mark)
    Console(width=max(120, Console().width)).print(table)


def run(args: argparse.Namespace) -> int:
    prompts = (
        [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        if args.prompts
        else list(CALIBRATION_PROMPTS)
    )
    if args.write and args.file is None:
        print("error: --write needs -f MANIFEST")
        return 2
    try:
        rule = cascade_rule(args)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    answers = asyncio.run(
        collect_answers(args.target, prompts, args.max_new_tokens, token=args.token, tls_ca=args.tls_ca)
    )
    samples = samples_for(answers, rule.probe_tokens, rule.window_tokens, rule.running_mean)
    try:
        result = choose_threshold(samples, args.retention)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    report(result, samples)
    print(
        f"confidenceThreshold: {result.threshold:.4f}  (edge serves {result.edge_share:.0%}, "
        f"retention {result.retention:.1%})"
    )
    if args.write:
        write_threshold(args.file, result.threshold)
        print(f"wrote {args.file}")
    return 0
