import os
import shutil
import tempfile

import pytest

from tests.helpers import SHARED_DATA

# Sample indexes (fastclr.data.index) go to a folder of this session, not beside ../shared/data: the suite neither
# writes into the shared data nor depends on what an earlier run left there. Set before any test (children inherit
# it); the tests of the index's own placement unset it.
INDEX_DIR = os.environ["FASTCLR_INDEX_DIR"] = tempfile.mkdtemp(prefix="fastclr-index-")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(INDEX_DIR, ignore_errors=True)


@pytest.fixture
def shared_data():
    """Path of the real test images beside the project; skipped on a clone that has no ../shared/data."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real test data not found at {SHARED_DATA} (it lies beside the project on CI, not in a clone)")
    return SHARED_DATA

