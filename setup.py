"""Packaging for tomoctfrefine: the engine, its CLI and its Scipion plugin."""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "tomoctfrefine" / "__init__.py").read_text()).group(1)

ENGINE = [
    "numpy>=1.24",
    "scipy>=1.10",
    "numba>=0.58",
    "mrcfile>=1.4",
    "starfile>=0.5",
    "emtable>=0.0.14",
    "matplotlib>=3.7",
    "pandas>=1.5",
]
SCIPION = ["scipion-pyworkflow>=3.10", "scipion-em>=3.9", "scipion-em-tomo>=3.10"]
MPI = ["mpi4py>=3.1", "mpich"]
TEST = ["pytest>=7", "hypothesis>=6"]

setup(
    name="tomoctfrefine",
    version=VERSION,
    description="Per-tilt CTF refinement for cryo-ET subtomogram averaging (RELION-compatible, Scipion plugin)",
    long_description=(HERE / "README.rst").read_text(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.10",
    packages=[
        "tomoctfrefine",
        "tomoctfrefine.io",
        "tomoctfrefine.pipeline",
        "tomoctfrefine.physics",
        "tomoctfrefine.refine",
        "tomoctfrefine.cli",
        "tomoctfrefine.protocols",
        "tomoctfrefine.wizards",
    ],
    package_dir={
        "tomoctfrefine": "tomoctfrefine",
        "tomoctfrefine.protocols": "protocols",
        "tomoctfrefine.wizards": "wizards",
    },
    package_data={"tomoctfrefine": ["protocols.conf"]},
    install_requires=ENGINE,
    extras_require={
        "scipion": SCIPION,
        "mpi": MPI,
        "test": TEST,
        "all": SCIPION + MPI + TEST,
    },
    entry_points={
        "console_scripts": ["tomoctfrefine = tomoctfrefine.cli:main"],
        "pyworkflow.plugin": ["tomoctfrefine = tomoctfrefine"],
    },
)
