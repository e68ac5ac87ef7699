"""The README's set-up commands and CI must not drift apart."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.rst").read_text()
    section = text.split("Set-up\n------", 1)[1]
    return [block.strip() for block in re.findall(r"\.\. code-block:: bash\n\n   (.+)\n", section)][:2]


def test_readme_opens_with_demo_and_test_commands():
    demo, tests = readme_commands()
    assert demo.endswith("tomoctfrefine demo")
    assert "pytest" in tests and tests.endswith(" tests")


def test_ci_runs_the_readme_test_command_verbatim():
    _, tests = readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines
