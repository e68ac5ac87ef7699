"""The order of the steps, written once: the CLI, the Python API, the protocol's steps and MPI follow it."""
from __future__ import annotations

#: Every step, in the order they run (names of :mod:`tomoctfrefine.pipeline`'s step functions).
STEPS = ("prepare", "refine_defocus", "refine_aberrations", "refine_scale", "write_outputs", "assess_refinement")


def plan(options) -> list[str]:
    """The steps a refinement with ``options`` (:class:`~tomoctfrefine.options.RefineOptions`) runs, in order.

    The defocus step also runs the hand check, so it runs whenever the hand is checked. The scale step comes
    last of the fits: it fits the scale model at the final CTF (after the aberrations' joint fit).
    """
    wanted = {
        "prepare": True,
        "refine_defocus": options.do_defocus or options.check_hand,
        "refine_aberrations": options.do_aberrations,
        "refine_scale": options.do_scale,
        "write_outputs": True,
        "assess_refinement": options.assess,
    }
    return [step for step in STEPS if wanted[step]]
