import os
import tarfile

import pytest

from tests.helpers import SHARED_DATA

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _extract(tar_path: str, dest: str, per_class: int) -> str:
    """The first ``per_class`` images of every class of a CIFAR tar, as ``dest/<split>/<class>/<NNNN>.jpg``."""
    with tarfile.open(tar_path) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and int(os.path.splitext(os.path.basename(m.name))[0])
                   < per_class]
        tf.extractall(dest, members=members, filter="data")
    split = members[0].name.split("/")[0]
    return os.path.join(dest, split)


def _shared_tar(name: str) -> str:
    tar = os.path.join(SHARED_DATA, name)
    if not os.path.isfile(tar):
        pytest.skip(f"real test data not found at {tar} (it lies beside the project on CI, not in a clone)")
    return tar


@pytest.fixture(scope="session")
def cifar_train_dir(tmp_path_factory):
    """30 real CIFAR-10 training JPEGs per class in an image-folder layout (300 files, a temporary copy)."""
    return _extract(_shared_tar("cifar10-train-10k.tar"), str(tmp_path_factory.mktemp("cifar")), per_class=30)


@pytest.fixture(scope="session")
def cifar_test_dir(tmp_path_factory):
    """10 real CIFAR-10 test JPEGs per class (100 files)."""
    return _extract(_shared_tar("cifar10-test-2k.tar"), str(tmp_path_factory.mktemp("cifar_test")), per_class=10)
