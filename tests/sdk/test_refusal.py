"""Every refusal of a message carries the same reason and detail, whichever layer refused."""

import pickle

import pytest

from fedsilo.privacy.envelope import EnvelopeError
from fedsilo.privacy.validation import InvalidTensors
from fedsilo.sdk.refusal import Refusal
from fedsilo.sdk.transport.chunking import ChunkError
from fedsilo.sdk.transport.codec import Rejected


@pytest.mark.parametrize(
    ("error", "also"),
    [
        (Rejected("protocol", "bad magic"), None),
        (EnvelopeError("stale", "too old"), ValueError),
        (InvalidTensors("nan", "w has NaN"), ValueError),
        (ChunkError("bad header", "missing x", "m1", dropped=True), ValueError),
    ],
)
def test_refusals_share_one_base(error: Refusal, also: type | None) -> None:
    assert isinstance(error, Refusal)
    assert also is None or isinstance(error, also)
    assert str(error) == f"{error.reason}: {error.detail}"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert (copy.reason, copy.detail) == (error.reason, error.detail)


def test_chunk_error_keeps_its_message_id_through_pickle() -> None:
    copy = pickle.loads(pickle.dumps(ChunkError("sha256 mismatch", "payload", "m1", True)))
    assert copy.message_id == "m1" and copy.dropped
