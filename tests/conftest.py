import os

import pytest

from tests.helpers import SHARED_DATA


@pytest.fixture
def shared_data():
    """Path of the real test images beside the project; skipped on a clone that has no ../shared/data."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real test data not found at {SHARED_DATA} (it lies beside the project on CI, not in a clone)")
    return SHARED_DATA

