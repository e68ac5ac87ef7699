"""The refinement as separate, resumable steps over tomograms (the CLI, the Python API and the Scipion protocol
all call these functions).

::

    prepare(opt, options, out_dir)     validate, claim the folder, then per tomogram: sufficient statistics
                                       (the only step that reads images; spread over MPI ranks)
    refine_defocus(out_dir)            per tomogram: defocus, astigmatism, per-tilt scale estimate, hand check
    refine_aberrations(out_dir)        per optics group: even/odd Zernike, jointly with defocus and scale
    refine_scale(out_dir)              scale model (per frame, Beer-Lambert per tomogram or global)
    write_outputs(out_dir)             RELION files, summary.json, plots, logfile.pdf
    assess_refinement(out_dir)         (--assess) reconstructions before and after, FSC gain

:func:`plan` says which of them a run needs, in this order; :func:`run_refinement` runs them all.
Every step reads what the previous steps saved under ``out_dir/temp`` and saves its own results atomically,
stamped with the inputs and options they depend on (:mod:`.workspace`), so a run killed at any moment and
resumed (``--only_do_unfinished``) writes exactly what an uninterrupted run with the same inputs and options
writes, and a resumed run with other options redoes what they change (RELION's resumed scale step instead
sees the defocus of the earlier run, up to 12 % off).

Modules: :mod:`.workspace` (the folder, its lock and its keys), :mod:`.artefacts` (what each step keeps),
:mod:`.inputs` (the inputs as the steps see them), :mod:`.plan`, one module per step (:mod:`.prepare`,
:mod:`.defocus`, :mod:`.aberrations`, :mod:`.scale`, :mod:`.outputs`, :mod:`.assessment`), and
:mod:`.runner` (running the plan).
"""
from ..options import RefineOptions, option_problems
from .aberrations import refine_aberrations
from .assessment import assess_refinement
from .defocus import refine_defocus
from .outputs import write_outputs
from .plan import STEPS, plan
from .prepare import prepare
from .runner import Terminated, run_refinement, run_step
from .scale import refine_scale
from .workspace import JobAborted, Workspace

__all__ = ["RefineOptions", "option_problems", "STEPS", "plan", "prepare", "refine_defocus", "refine_aberrations",
           "refine_scale", "write_outputs", "assess_refinement", "run_refinement", "run_step", "Workspace",
           "JobAborted", "Terminated"]
