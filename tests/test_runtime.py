import ctypes.util
import sys

import pytest

from fruitlens.runtime import limit_heap_growth


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""),
    reason="glibc's mallopt exists on Linux with glibc only",
)
def test_heap_growth_limit_applies_on_glibc():
    assert limit_heap_growth() is True
    assert limit_heap_growth() is True  # idempotent
