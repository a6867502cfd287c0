"""fastclr: large-batch SimCLR pretraining (DALI, Triton NT-Xent, DeepSpeed + LARS).

CPU machines: install ``torch==2.13.0`` (the CPU build) first, then ``pip install -e .[cpu,test]``.
CUDA machines: install a CUDA build of torch first, then ``pip install -e .[cuda12]`` or ``.[cuda13]`` (the DALI wheel
matching the driver's CUDA major version). ``launchers/install.sh`` does this selection.
"""
from setuptools import find_packages, setup

# DALI wheels are per CUDA major version; the CPU operators used on machines without a GPU live in every one of them.
DALI_CUDA12 = "nvidia-dali-cuda120>=1.40"
DALI_CUDA13 = "nvidia-dali-cuda130>=1.40"

setup(
    name="fastclr",
    version="0.1.0",
    description="Fast large-batch SimCLR pretraining: DALI augmentation, Triton NT-Xent, DeepSpeed + LARS",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastclr", "fastclr.*"]) + ["fastclr_kernels"],
    # The Triton kernels live in kernels/ but install as fastclr_kernels: a bare `kernels` would collide with other
    # distributions that ship a top-level package of that name.
    package_dir={"fastclr_kernels": "kernels"},
    # The recipes (launchers/configs in a checkout links here), so that an installed `fastclr pretrain --config NAME`
    # finds them.
    package_data={"fastclr": ["recipes/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "deepspeed>=0.15",
        "triton>=3.0",
        "scikit-learn>=1.3",  # the embedded default dataset (bundled handwritten digits)
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "pillow>=10.0",
        "safetensors>=0.4",  # exported weights that load without unpickling
    ],
    entry_points={"console_scripts": ["fastclr = fastclr.cli:main"]},
    extras_require={
        "cpu": [DALI_CUDA13],
        "cuda12": [DALI_CUDA12],
        "cuda13": [DALI_CUDA13],
        "test": ["pytest>=7.4", "kornia>=0.7"],  # the suite's test runs the Kornia baseline too
        "bench": ["kornia>=0.7"],  # the data benchmark's Kornia baseline
    },
)
