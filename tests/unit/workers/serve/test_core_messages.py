"""The step message (`StepOutput.pack`/`unpack`): with plain verdicts, pickled as the engine channel does, every
result comes back equal and in its place; without, the results are the core's own objects; a result of neither
shape is refused, saying what came."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from stratus_workers.serve.core import EngineStats, Finished, StepOutput
from stratus_workers.serve.surface import DraftResult, SparseDist, VerifyResult

pytestmark = pytest.mark.unit


def step() -> StepOutput:
    out = StepOutput(
        9,
        finished=[Finished(3, "stop", 5, 2, 0, 1.5, 1.75)],
        stats=EngineStats(active=1, steps=9, forward_passes=4, prefill_steps=2),
        results=[
            (1, "", VerifyResult(2, 17, (-0.5, -0.25, -1.0), False)),
            (2, "invalid", "the context holds token ids outside the vocabulary"),
            (3, "", DraftResult((4, 5), (SparseDist((4, 6), (0.75, 0.25)), SparseDist((5,), (1.0,))), False)),
            (4, "", VerifyResult(0, 2, (), True)),
            (5, "", (-0.5, -2.0)),  # a Score call
            (6, "", None),  # an end call
        ],
    )
    out.add(3, 11, None)
    return out


def test_plain_verdicts_cross_the_channel_and_come_back_equal_in_their_places() -> None:
    out = step()
    packed = out.pack(plain_verdicts=True)
    got = StepOutput.unpack(pickle.loads(pickle.dumps(packed, protocol=pickle.HIGHEST_PROTOCOL)))
    assert got == out
    assert [type(value) for _, _, value in got.results] == [type(value) for _, _, value in out.results]
    wire = pickle.dumps(packed, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"VerifyResult" not in wire  # the verdicts went as plain tuples
    assert b"VerifyResult" in pickle.dumps(out.pack(), protocol=pickle.HIGHEST_PROTOCOL)


def test_without_plain_verdicts_the_results_are_the_cores_own() -> None:
    out = step()
    got = StepOutput.unpack(out.pack())
    assert got == out
    assert all(a[2] is b[2] for a, b in zip(got.results, out.results, strict=True))


@pytest.mark.parametrize("result", [(1, 2, 17, (), False, "extra"), (1, 2, 17, ()), (1,)])
def test_a_result_of_neither_shape_is_refused_saying_what_came(result: tuple[Any, ...]) -> None:
    packed = list(step().pack(plain_verdicts=True))
    packed[5] = [result]
    with pytest.raises(ValueError, match=r"result is \(call id, error kind, value\) or a verdict") as e:
        StepOutput.unpack(tuple(packed))
    assert repr(result) in str(e.value)
