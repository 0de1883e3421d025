from setuptools import find_packages, setup

setup(
    name="ffcv-transfer",
    version="0.1.0",
    description="High-throughput FFCV training engine for a data-based view of transfer learning",
    packages=find_packages(include=["ffcv_transfer", "ffcv_transfer.*"]),
    package_data={"ffcv_transfer.writers": ["imagenet1k_classes.tsv"]},
    python_requires=">=3.10",
    # The light core is what the influence kernel (ffcv_transfer.findings.kernel) and the command line's parser
    # need; training, betons, configs, the figures and the report need the `engine` extra.
    install_requires=["numpy"],
    extras_require={
        "engine": [
            "torch>=2.1",
            "ffcv==1.0.2",
            "numba",
            "fastargs",
            "pyyaml",
            "pillow",
            "scipy",  # the .mat metadata of ImageNet's devkit, Flowers-102 and Stanford Cars
            "tqdm",
            "matplotlib",
        ],
        "gpu": ["cupy-cuda12x"],
        "slurm": ["submitit>=1.5"],
        "dev": ["pytest>=7", "pytest-timeout", "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["ffcv-transfer=ffcv_transfer.cli:main"]},
)
