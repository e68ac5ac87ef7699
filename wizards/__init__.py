"""Scipion wizards of tomoctfrefine (installed as ``tomoctfrefine.wizards``)."""
from .wizards import TomoCtfRefineBoxSizeWizard, TomoCtfRefineDefocusRangeWizard

__all__ = ["TomoCtfRefineBoxSizeWizard", "TomoCtfRefineDefocusRangeWizard"]
