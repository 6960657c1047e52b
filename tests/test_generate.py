"""Generation on the real stack: errors raised inside the generation thread reach the caller."""

import pytest
import torch
from helpers import finishes_within

from qlora_cli.errors import QloraError
from qlora_cli.generate import BASE, Sampling, open_session

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def base_session(tiny_base):
    return open_session([BASE], base=str(tiny_base))


def stream(session, row, adapter, sampling) -> dict:
    """Drain session.stream in a thread: {"value": the text} or {"error": what it raised}; a regression then fails
    the test instead of hanging the suite."""
    return finishes_within(300, lambda: "".join(session.stream(row, adapter, sampling)))


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "generation with adapter 'none' ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); "
            "lower --max-new-tokens, use fewer adapters at once, or free the GPU",
        ),
        (RuntimeError("device-side assert"), "generation with adapter 'none' failed: RuntimeError: device-side assert"),
    ],
    ids=["out of memory", "other error"],
)
def test_an_error_inside_generation_surfaces_instead_of_hanging(base_session, failure, message):
    calls = []

    def fail_on_third_forward(module, args, output):
        calls.append(1)
        if len(calls) == 3:  # after two tokens have been streamed
            raise failure

    handle = base_session.model.register_forward_hook(fail_on_third_forward)
    try:
        outcome = stream(base_session, {"instruction": "List all users."}, BASE, Sampling(max_new_tokens=16))
    finally:
        handle.remove()
    assert isinstance(outcome.get("error"), QloraError), outcome
    assert str(outcome["error"]) == message


def test_streaming_still_yields_the_answer(base_session):
    outcome = stream(base_session, {"instruction": "List all users."}, BASE, Sampling(max_new_tokens=8))
    assert "error" not in outcome
    assert (
        outcome["value"].strip()
        == base_session.ask([{"instruction": "List all users."}], BASE, Sampling(max_new_tokens=8))[0]
    )
