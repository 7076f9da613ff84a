"""Data-free model extraction: TandemGAN (chapter 3), DFME and IDEAL, under a hard, logged query budget.

Each attack takes an ``Oracle`` (kdtools.oracle.open_oracle), asks it only through ``BudgetedOracle``
(every call, gradient probes included, is reserved in the HDF5 log before it is made) and writes
``DIR/substitute.safetensors``, ``DIR/generator.safetensors``, periodic checkpoints and a resume state
(see common.py).
"""

from .common import AttackOptions, AttackResult, AttackRun
from .dfme import DFME, DFMEConfig
from .ideal import IDEAL, IDEALConfig
from .tandemgan import TandemConfig, TandemGAN

METHODS = {"tandemgan": (TandemGAN, TandemConfig), "dfme": (DFME, DFMEConfig), "ideal": (IDEAL, IDEALConfig)}

__all__ = ["AttackOptions", "AttackResult", "AttackRun", "METHODS", "TandemGAN", "TandemConfig", "DFME", "DFMEConfig",
           "IDEAL", "IDEALConfig"]
