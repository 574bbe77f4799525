"""Packaging: `kernels/`, `pipelines/` and `languages/` install under the `workbench` namespace.

A top-level `kernels` module would collide with Hugging Face's `kernels` package, which `transformers`
imports, so the folders are mapped with `package_dir`. `kernels/` and `pipelines/` have no `__init__.py`
(see workbench/__init__.py): from the repository root, Hugging Face's `kernels` still wins.
"""
import os

from setuptools import setup

# Installed package name -> folder in this repository.
ROOTS = {
    "workbench": "workbench",
    "workbench.kernels": "kernels",
    "workbench.pipelines": "pipelines",
    "workbench.languages": "languages",
}


def _packages():
    """Every package under each root, with its folder, so subpackages map too."""
    packages, package_dir = [], {}
    for name, folder in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if not any(f.endswith(".py") for f in filenames):
                continue
            rel = os.path.relpath(dirpath, folder)
            pkg = name if rel == "." else name + "." + rel.replace(os.sep, ".")
            packages.append(pkg)
            package_dir[pkg] = dirpath
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()

setup(
    name="workbench",
    version="0.1.0",
    description="Low-resource language adaptation workbench: continual pretraining, task experts, "
                "and fused Triton merge kernels (TIES-SV, layer swapping).",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"workbench.kernels": ["*.c"], "workbench.languages": ["*.yaml", "profiles/*.yaml", "corpora/*.txt", "corpora/*.md", "mgsm/*.tsv", "mgsm/*.md", "mgsm/LICENSE"]},
    include_package_data=False,
    install_requires=[
        # The upper bound keeps pip on the CPU wheel this machine has (2.13.0) and never pulls
        # a newer CUDA build; widen it only after checking that nothing else would be pulled.
        "torch>=2.4,<2.14",
        "triton>=3.6",  # tested: 3.6.0 (torch 2.11, GPU) and 3.9.0 (torch 2.13); README, "Merge methods and kernels"
        "transformers>=4.46",
        "peft>=0.13",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors>=0.4.3",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "huggingface_hub>=0.25",
        "gguf>=0.10",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
    ],
    extras_require={
        # lm-eval too: its bridge is tested on a local task (tests/pipelines/test_evaluate.py)
        "test": ["pytest>=8", "pytest-benchmark>=4", "lm-eval>=0.4.13"],
        # lm-eval's standard tasks (eval.lm_eval, --lm-eval); its base install asks for no torch, so the
        # CPU build stays
        "eval": ["lm-eval>=0.4.13"],
    },
    entry_points={"console_scripts": ["workbench=workbench.cli:main"]},
)
