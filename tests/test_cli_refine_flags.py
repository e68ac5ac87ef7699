"""``tomoctfrefine refine`` takes RELION's flags, and refuses what RELION silently accepts."""
import subprocess
import sys

import pytest

from tomoctfrefine.cli import build_parser
from tomoctfrefine.cli.refine import check_flags



def run_cli(*arguments):
    result = subprocess.run([sys.executable, "-m", "tomoctfrefine", *arguments], capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


def parse(*arguments):
    return build_parser().parse_args(["refine", *arguments])


def test_relion_defaults():
    args = parse("--i", "x.star", "--o", "out", "--b", "128")
    assert (args.d0, args.d1, args.ds, args.kmin, args.lambda_, args.j) == (-3000.0, 3000.0, 100, 30.0, 0.001, 6)
    assert (args.ne, args.no, args.min_frame, args.max_frame, args.cutoff_fract, args.fsc_thresh_width) == (4, 3, 0, -1, 0.02, 5.0)
    assert not (args.do_defocus or args.do_scale or args.per_frame_scale or args.per_tomogram_scale)
    assert check_flags(args) == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--i", "x.star", "--o", "out"], "error: --b: the estimation box size is required; give --b, e.g. --b 256"),
        (["--i", "x.star", "--o", "out", "--b", "129"], "error: --b: the box size must be a positive even number, got 129; use an even --b such as 128, 256 or 512"),
        (["--i", "x.star", "--b", "128"], "error: --o: the output directory is required; give --o DIR"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--do_scale", "--per_frame_scale", "--per_tomogram_scale"],
         "error: --per_frame_scale/--per_tomogram_scale: the two scale models contradict each other; choose one scale model"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--do_defocus", "--d0", "3000", "--d1", "3000"],
         "error: --d0/--d1: the defocus scan is empty: --d0 3000 is not below --d1 3000; scan a range such as --d0 -3000 --d1 3000"),
        (["--i", "x.star", "--o", "out", "--b", "128", "--frobnicate"],
         "error: tomoctfrefine refine: unknown flag(s) --frobnicate; see 'tomoctfrefine refine --help'"),
        (["--o", "out", "--b", "128"], "error: --i: no input: give an optimisation set with --i, or --p, --t, --ref1 and --ref2; add --i optimisation_set.star"),
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


def test_help_groups_flags_as_relion_does():
    code, out, _ = run_cli("refine", "--help")
    assert code == 0
    for group in ("I/O:", "Reference map:", "Defocus refinement options:", "Scale estimation options:",
                  "Aberration refinement options:", "Computational options:"):
        assert group in out
    assert "--per_tomo_scale" not in out
