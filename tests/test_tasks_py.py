"""Importing fabdeploy's tasks into a project's tasks.py, exactly as the README shows."""
import re
import subprocess
import urllib.request

import pytest

from conftest import FAB, ROOT


def readme_tasks_py() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example: tasks.py -->\n```python\n(.*?)```", readme, re.S)
    assert match, "the README lost its tasks.py example"
    return match.group(1)


def test_the_repo_tasks_py_lists_its_own_and_fabdeploy_tasks():
    out = subprocess.run([FAB, "-c", "tasks", "--list"], cwd=ROOT, capture_output=True,
                         text=True, check=True, stdin=subprocess.DEVNULL).stdout
    for name in ("test", "demo", "deploy", "rollback", "releases", "unlock"):
        assert re.search(rf"^\s+{name}\b", out, re.M), name


@pytest.mark.host
def test_readme_tasks_py_deploys(project, host):
    (project.path / "fabfile.py").unlink()
    (project.path / "tasks.py").write_text(readme_tasks_py())
    listing = subprocess.run([FAB, "-c", "tasks", "--list"], cwd=project.path, capture_output=True,
                             text=True, check=True, stdin=subprocess.DEVNULL).stdout
    assert "hello" in listing and "deploy" in listing
    project.fab("-c", "tasks", "deploy")
    assert urllib.request.urlopen(host.url, timeout=10).read().startswith(b"Hello from the guestbook")
    own = subprocess.run([FAB, "-c", "tasks", "hello"], cwd=project.path, capture_output=True,
                         text=True, check=True, stdin=subprocess.DEVNULL).stdout
    assert "hello from tasks.py" in own
