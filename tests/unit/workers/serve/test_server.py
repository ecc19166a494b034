"""The servicer's request handling that needs no server: a Verify request's checked arguments, the settings' checks."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.requests import MAX_SPECULATIVE_TOKENS, session_sampling
from stratus_workers.serve.server import ServerSettings, verify_arguments

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "seed": 5}
# Per field of SpeculativeSampling, a value other than BASE's: a call differing from another in that field
# alone must get its own sampling, not the other's (verify_arguments caches it per setting).
OTHER: dict[str, Any] = {"temperature": 1.3, "top_p": 0.5, "seed": 6}


def test_every_field_of_the_sampling_reaches_the_verify_call() -> None:
    fields = {f.name for f in pb.SpeculativeSampling.DESCRIPTOR.fields}
    assert set(OTHER) == fields, "a field added to SpeculativeSampling needs a value in OTHER"
    base = pb.SpeculativeSampling(**BASE)
    assert verify_arguments(pb.VerifyRequest(session_id="s", sampling=base))[4] == session_sampling(base)
    for name, value in OTHER.items():
        spec = pb.SpeculativeSampling(**(BASE | {name: value}))
        assert session_sampling(spec) != session_sampling(base), name
        assert verify_arguments(pb.VerifyRequest(session_id="s", sampling=spec))[4] == session_sampling(spec), name
    unseeded = pb.SpeculativeSampling(temperature=0.7, top_p=0.9)
    assert verify_arguments(pb.VerifyRequest(session_id="s", sampling=unseeded))[4].seed is None
    assert verify_arguments(pb.VerifyRequest(session_id="s"))[4].greedy


def test_bad_verify_requests_are_refused_with_what_is_wrong() -> None:
    def refused(request: pb.VerifyRequest) -> str:
        with pytest.raises(ProtocolError) as caught:
            verify_arguments(request)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        return caught.value.message

    bad_temperature = pb.VerifyRequest(session_id="s", sampling=pb.SpeculativeSampling(temperature=3.0))
    assert "sampling.temperature is 3.0" in refused(bad_temperature)
    assert "sampling.temperature is 3.0" in refused(bad_temperature)  # a refusal is not cached as a setting
    too_long = pb.VerifyRequest(session_id="s", draft=[1] * (MAX_SPECULATIVE_TOKENS + 1))
    assert refused(too_long) == f"{MAX_SPECULATIVE_TOKENS + 1} draft tokens; at most {MAX_SPECULATIVE_TOKENS}"
    sampled = pb.SpeculativeSampling(temperature=1.0)
    assert "one distribution per draft token" in refused(pb.VerifyRequest(session_id="s", draft=[1], sampling=sampled))
    uneven = pb.SparseDistribution(token_ids=[1, 2], probs=[1.0])
    request = pb.VerifyRequest(session_id="s", draft=[1], sampling=sampled, distributions=[uneven])
    assert "one probability per token id" in refused(request)


def test_the_stream_message_rate_must_not_be_negative() -> None:
    ServerSettings(model="m", stream_message_rate=0).validate()  # 0: unpaced
    with pytest.raises(ValueError, match="stream_message_rate must be 0"):
        ServerSettings(model="m", stream_message_rate=-1).validate()
