"""The docs run: the adding-a-mixer walk-through and the README example."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def files_in(markdown: Path) -> dict[str, str]:
    """Code blocks preceded by '<!-- file: NAME -->', by NAME."""
    text = markdown.read_text()
    pattern = r"<!-- file: (\S+) -->\s*```\w*\n(.*?)```"
    return {name: body for name, body in re.findall(pattern, text, flags=re.S)}


def run(args, cwd, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_adding_a_mixer_walkthrough(tmp_path):
    files = files_in(ROOT / "docs" / "adding-a-mixer.md")
    assert set(files) == {"my_mixers.py", "my_registry.yaml", "use_it.py"}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    env = {"ZOO_REGISTRY": "my_registry.yaml"}  # as the doc writes it: relative, no PYTHONPATH
    r = run([sys.executable, "use_it.py"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch.Size([2, 32, 256])"
    for args, extra in ((["list"], env), (["list", "--registry", "my_registry.yaml"], {})):
        r = run([sys.executable, "-m", "zoo", *args], tmp_path, extra)
        assert r.returncode == 0 and "| shortconv | strict | yes | yes |" in r.stdout, r.stderr
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(ROOT / "tests" / "test_contract.py"), "-k", "shortconv"], ROOT,
            {"ZOO_REGISTRY": str(tmp_path / "my_registry.yaml")})
    assert r.returncode == 0, r.stdout + r.stderr
    counts = re.search(r"(\d+) passed", r.stdout)
    assert counts and int(counts.group(1)) >= 7, r.stdout  # shape, causality, batch, step, ...


def test_readme_python_example(tmp_path):
    files = files_in(ROOT / "README.md")
    assert "example.py" in files
    (tmp_path / "example.py").write_text(files["example.py"])
    r = run([sys.executable, "example.py"], tmp_path)
    assert r.returncode == 0, r.stderr
