"""Scipion protocols of tomoctfrefine (installed as ``tomoctfrefine.protocols``).

Scipion's Domain collects the protocol classes visible in this module, so every protocol is
re-exported here.
"""
from .protocol_tomo_ctf_refine import ProtTomoCtfRefine
from .protocol_import_relion_metadata import ProtTomoImportRelionMetadata

__all__ = ["ProtTomoCtfRefine", "ProtTomoImportRelionMetadata"]
