"""``tomoctfrefine refine`` takes RELION's flags, and refuses what RELION silently accepts.

The flags are made from the options schema (``tomoctfrefine.options``): every field with a flag is parsed into
its field, and the defaults are RELION's.
"""
import dataclasses
import subprocess
import sys

import pytest

from tomoctfrefine import __version__
from tomoctfrefine import options as schema
from tomoctfrefine.cli import build_parser
from tomoctfrefine.cli.refine import check_flags, options_from_args

#: Every flag of relion_tomo_refine_ctf 5.0 (its --help), and what is not an option of the refinement.
RELION_FLAGS = ("--i", "--p", "--t", "--mot", "--o", "--ref1", "--ref2", "--mask", "--fsc", "--freq_cutoff",
                "--fsc_thresh_width", "--use_SNR_weight", "--b", "--j", "--only_do_unfinished", "--per_frame_noise",
                "--diag", "--do_defocus", "--do_reg_defocus", "--lambda", "--d0", "--d1", "--ds", "--kmin",
                "--reset_to_common", "--do_scale", "--per_frame_scale", "--per_tomogram_scale", "--do_even_aberrations",
                "--ne", "--do_odd_aberrations", "--no", "--min_frame", "--max_frame", "--cutoff_fract", "--theme",
                "--list_themes", "--pipeline_control")


def run_cli(*arguments):
    result = subprocess.run([sys.executable, "-m", "tomoctfrefine", *arguments], capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


def parse(*arguments):
    return build_parser().parse_args(["refine", *arguments])


def test_relion_defaults():
    args = parse("--i", "x.star", "--o", "out", "--b", "128")
    options = options_from_args(args)
    assert (options.defocus_scan_min_angstrom, options.defocus_scan_max_angstrom, options.defocus_scan_steps,
            options.kmin_angstrom, options.regularisation_lambda, options.threads) == (-3000.0, 3000.0, 100, 30.0, 0.001, 6)
    assert (options.even_order, options.odd_order, options.min_frame, options.max_frame, options.cutoff_fraction,
            options.fsc_threshold_width_px) == (4, 3, 0, -1, 0.02, 5.0)
    assert not (options.do_defocus or options.do_scale or options.regularise_defocus or options.diagnostics)
    assert options.scale_mode == "global" and options.regularised_components == "all"
    assert check_flags(args) == []


def test_every_relion_flag_is_known():
    parser = build_parser()
    refine = parser._subparsers._group_actions[0].choices["refine"]
    known = {flag for action in refine._actions for flag in action.option_strings}
    assert set(RELION_FLAGS) <= known


def _non_default(field):
    meta = field.metadata
    if meta["kind"] in ("switch", "inverted_switch"):
        return [meta["flag"]], not field.default
    if meta["kind"] == "choice":
        value, flag = next(iter(meta["values"].items()))
        return [flag], value
    value = {"box_size_px": 96, "even_order": 6, "odd_order": 5, "defocus_scan_steps": 7, "threads": 3,
             "min_frame": 2, "max_frame": 9}.get(field.name)
    if value is None:
        value = field.default + 0.5
    return [meta["flag"], str(value)], value


@pytest.mark.parametrize("field", [f for f in schema.fields() if f.metadata["flag"] or f.metadata["kind"] == "choice"],
                         ids=lambda f: f.name)
def test_each_flag_sets_its_field_and_nothing_else(field):
    """A flag that does not reach RefineOptions would be parsed and ignored."""
    arguments, value = _non_default(field)
    base = ["--i", "x.star", "--o", "out"] + ([] if field.name == "box_size_px" else ["--b", "128"])
    options = options_from_args(parse(*base, *arguments))
    reference = options_from_args(parse(*base, *(["--b", "96"] if field.name == "box_size_px" else [])))
    assert getattr(options, field.name) == value
    differing = [f.name for f in schema.fields() if getattr(options, f.name) != getattr(reference, f.name)]
    assert differing == ([] if field.name == "box_size_px" else [field.name])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--i", "x.star", "--o", "out"], "error: --b: the estimation box size is required; give it, e.g. 256"),
        (["--i", "x.star", "--o", "out", "--b", "129"],
         "error: --b: the box size must be an even number of pixels, at least 16, got 129; use an even box such as 128, 256 or 512"),
        (["--i", "x.star", "--b", "128"], "error: --o: the output directory is required; give --o DIR"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--do_scale", "--per_frame_scale", "--per_tomogram_scale"],
         "error: --per_frame_scale/--per_tomogram_scale: the per-frame and per-tomogram scale models exclude each other; "
         "choose one of them"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--do_defocus", "--d0", "3000", "--d1", "3000"],
         "error: --d0/--d1: the defocus scan is empty: 3000 Å is not below 3000 Å; scan a range such as -3000 to 3000 Å"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--do_defocus", "--d1", "inf"],
         "error: --d1: the highest defocus offset must be a finite number, got inf; scan a range such as -3000 to 3000 Å"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--lambda", "nan"],
         "error: --lambda: the regularisation strength must be a finite number, got nan; use e.g. 0.1"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--ds", "1e9"],
         "error: tomoctfrefine refine: argument --ds: expected a whole number, got '1e9'; see 'tomoctfrefine refine --help'"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--j", "0"], "error: --j: the thread count must be at least 1, got 0; use 1 or more"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--cutoff_fract", "1.5"],
         "error: --cutoff_fract: the cutoff fraction must lie in [0, 1), got 1.5; use e.g. 0.02"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--min_frame", "5", "--max_frame", "3"],
         "error: --max_frame: the tilt range is empty: the last tilt 3 is before the first 5; give a last tilt at or "
         "after the first, or -1 for all"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--reset_to_common"],
         "error: --reset_to_common: resetting to the common CTF needs a regularised defocus refinement; add --do_defocus "
         "--do_reg_defocus, or leave it out"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--frobnicate"],
         "error: tomoctfrefine refine: unknown flag(s) --frobnicate; see 'tomoctfrefine refine --help'"),
        (["--o", "out", "--b", "128"],
         "error: --i: no input: give an optimisation set with --i, or --p, --t, --ref1 and --ref2; add --i optimisation_set.star"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(arguments, message):
    code, _, err = run_cli("refine", *arguments)
    assert code == 2
    assert message in err.splitlines()
    assert "Traceback" not in err


def test_per_tomo_scale_is_read_as_per_tomogram_scale_with_a_notice():
    code, _, err = run_cli("refine", "--o", "out", "--b", "129", "--per_tomo_scale", "--i", "x.star")
    assert code == 2  # stopped by the odd box, after the notice
    assert err.splitlines()[0].startswith("notice: --per_tomo_scale is read as --per_tomogram_scale")
    args = parse("--o", "out", "--b", "128", "--per_tomo_scale", "--i", "x.star")
    args.choice_scale_mode_per_tomogram = args.per_tomo_scale
    assert options_from_args(args).scale_mode == "per_tomogram"


def test_help_groups_flags_as_relion_does_and_shows_defaults():
    code, out, _ = run_cli("refine", "--help")
    assert code == 0
    for group in ("I/O:", "Reference map:", "Defocus refinement options:", "Scale estimation options:",
                  "Aberration refinement options:", "Computational options:", "tomoctfrefine's own options:"):
        assert group in out
    assert "--per_tomo_scale" not in out
    flat = " ".join(out.split())
    for text in ("(default: -3000)", "(default: 3000)", "(default: 100)", "(default: 0.001)", "(default: 30)",
                 "(default: 6)", "(default: 0.02)", "(required)"):
        assert text in flat


def test_version():
    for arguments in (["--version"], ["refine", "--version"]):
        code, out, _ = run_cli(*arguments)
        assert (code, out.strip()) == (0, f"tomoctfrefine {__version__}")


def test_options_from_the_python_api_are_checked_by_field_name():
    options = schema.RefineOptions(box_size_px=100, do_defocus=True, defocus_scan_max_angstrom=float("inf"))
    assert [str(p) for p in schema.option_problems(options, naming="field")] == [
        "RefineOptions [defocus_scan_max_angstrom]: the highest defocus offset must be a finite number, got inf; scan a range such as -3000 to 3000 Å"]
    assert dataclasses.replace(options, defocus_scan_max_angstrom=3000.0).fingerprint() != options.fingerprint()
