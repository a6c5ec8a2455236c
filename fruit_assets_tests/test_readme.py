"""The README stays true to the tree: every repository path it names exists (its text, and the Layout
section's tree), and its first two commands are the ones .ci/run runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TOP = r"(?:fruit_assets(?:_dev|_tests)?|benchmarks|docs|\.ci)"
# A repository path in the text: under a top-level folder of the repository and naming a file by its
# extension, not preceded by another path (~/.cache/fruit_assets/models, /dbfs/fruit_assets/...), nor a
# tag key such as fruit_assets/trigger.
IN_TEXT = re.compile(rf"(?<![\w/.~-])({TOP}/[\w./-]*\.(?:py|png|md|yaml|yml|toml|properties|npy|json)|{TOP}/)(?![\w/])")
TOP_FILES = ("workspace.yaml", "pyproject.toml", "BENCHMARKS.md", ".ci/run", "databricks.yaml")


def layout_paths(text: str) -> list[str]:
    """The paths of the Layout section's tree: one entry a line, children indented by two spaces under a
    folder ending in "/", several entries on a line separated by ", ", a description after two spaces."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths, folders = [], []
    for line in block.splitlines()[1:]:
        indent = len(line) - len(line.lstrip(" "))
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        if not names or indent % 2 or indent // 2 > len(folders):
            continue  # a continued description
        folders = folders[: indent // 2]
        for name in names.split(", "):
            paths.append("".join(folders) + name)
        if names.endswith("/"):
            folders.append(names)
    return paths


def test_every_path_the_readme_names_exists():
    named = set(IN_TEXT.findall(README)) | {name for name in TOP_FILES if name in README}
    assert "fruit_assets/storage/spark_io.py" in named  # the pattern finds paths in the text
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_every_path_of_the_layout_tree_exists():
    paths = layout_paths(README)
    assert {"fruit_assets/", "fruit_assets/storage/delta.py", "fruit_assets_dev/local_s3.py"} <= set(paths)
    missing = [path for path in paths if not (REPO / path).exists()]
    assert not missing, f"README.md's Layout names paths that do not exist: {missing}"


def test_the_readme_test_command_is_what_ci_runs():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(commands) == 2 and commands[1].endswith(".venv/bin/pytest")
    assert commands[1] in (REPO / ".ci" / "run").read_text()


def test_the_readme_installs_with_the_uv_that_pyproject_pins():
    pinned = re.search(r'"uv==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    for command in commands:
        assert f"pip install -q uv=={pinned} && .venv/bin/uv pip install" in command, command
