"""How a Range header on a blob is answered, as Go's ServeContent (and so distribution)
answers it."""
from __future__ import annotations

import pytest

from nixeryd.api import NONE, PARTS, WHOLE, range_answer


@pytest.mark.parametrize(("header", "answer"), [
    (None, WHOLE),
    (b"bytes=0-9", PARTS),
    (b"bytes=-10", PARTS),
    (b"bytes=50-", PARTS),
    (b"bytes=100-200", NONE),
    (b"bytes=0-99", PARTS),
    (b"bytes=0-49,50-99", PARTS),
    (b"bytes=0-99,0-99", WHOLE),  # more than the blob
    (b"bytes=0-10,5-15", WHOLE),  # overlapping
    (b"bytes=90-95,-8", WHOLE),  # a suffix overlapping a range
    (b"bytes=0-10,11-20", PARTS),  # adjacent, not overlapping
    (b"bytes=-5,0-4", PARTS),
    (b"items=0-1", WHOLE),
    (b"bytes=a-b", WHOLE),
    (b"bytes=0-" + b"9" * 5000, WHOLE),  # past what int() reads: never a 500
    (b"bytes=" + b"1" * 19 + b"-", WHOLE),
    (b"bytes=-" + b"9" * 4400, WHOLE),
])
def test_range_answers(header: bytes | None, answer: str) -> None:
    assert range_answer(header, 100) == answer
