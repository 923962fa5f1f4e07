from setuptools import find_packages, setup

setup(
    name="nixeryd",
    version="0.1.0",
    description="A container registry that builds images on demand with Nix",
    python_requires=">=3.11",
    packages=find_packages(include=["nixeryd", "nixeryd.*"]) + ["twisted.plugins"],
    package_data={"nixeryd": ["py.typed"], "twisted": ["plugins/nixeryd_plugin.py"]},
    data_files=[
        ("share/nixeryd/nix", ["nix/build.nix", "nix/load-pkgs.nix", "nix/popularity.nix"])
    ],
    install_requires=[
        "twisted[tls]>=23.10",
        "klein>=23.5",
        "treq>=23.11",
        "google-cloud-storage>=2.14",
        "cryptography>=42",
        "prometheus-client>=0.17",
        "bcrypt>=4",
        # Layer bytes, and so digests, depend on the compressor: pinned exactly.
        "zlib-ng==1.1.0",
        "zstandard>=0.22",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14", "gcp-storage-emulator", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["nixeryd = nixeryd.cli:main"]},
)
