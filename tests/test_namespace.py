"""One import namespace: kvstore/, replay/, trainer/ and configs/ install as ``vinekv.<folder>``, so a
project with its own ``trainer.py`` or ``configs.py`` imports vinekv's API beside them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BARE = ("kvstore", "replay", "trainer", "configs")
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repository is not on the path

USER_PROJECT = {
    "trainer.py": "WHO = 'the user trainer'\n",
    "configs.py": "WHO = 'the user configs'\n",
    "kvstore.py": "WHO = 'the user kvstore'\n",
    "replay.py": "WHO = 'the user replay'\n",
}

SCRIPT = textwrap.dedent(
    """
    import sys
    from vinekv.configs import TrainConfig, load
    from vinekv.kvstore import SnapshotStore, get_codec
    from vinekv.replay import MCRecord, mc_values, replay_run
    from vinekv.trainer import VinePPOConfig, VinePPOTrainer, mc_gae, trajectory_advantages
    import configs, kvstore, replay, trainer

    assert VinePPOTrainer.__module__ == "vinekv.trainer.vineppo_trainer", VinePPOTrainer.__module__
    assert SnapshotStore.__module__ == "vinekv.kvstore.store" and TrainConfig.__module__ == "vinekv.configs.train"
    print(trainer.WHO, configs.WHO, kvstore.WHO, replay.WHO, sep="|")
    print(sorted(m for m in sys.modules if m.split(".")[0] in {bare} and "." in m))
    """
).format(bare=set(BARE))


def test_the_api_imports_beside_a_project_with_its_own_trainer_and_configs(tmp_path):
    for name, body in USER_PROJECT.items():
        (tmp_path / name).write_text(body)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV
    )
    assert out.returncode == 0, out.stderr[-3000:]
    who, stray = out.stdout.strip().splitlines()[-2:]
    assert who.split("|") == [USER_PROJECT[f"{n}.py"][7:-2] for n in ("trainer", "configs", "kvstore", "replay")]
    assert stray == "[]"  # nothing of vinekv loaded under a bare folder name


def test_the_cli_runs_from_a_project_with_its_own_trainer(tmp_path):
    (tmp_path / "trainer.py").write_text("raise ImportError('the user trainer.py was imported')\n")
    vinekv = Path(sys.executable).parent / "vinekv"
    argv = [str(vinekv), "train", "--help"]
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--steps" in out.stdout


def test_every_package_folder_installs_under_vinekv():
    """pyproject's package list maps each source folder holding an ``__init__.py`` to ``vinekv.*``
    (a folder left out would be missing from a wheel while an editable install still finds it)."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = tool["package-dir"]
    assert roots == {"vinekv": "vinekv", **{f"vinekv.{b}": b for b in BARE}}
    expected = set()
    for package, folder in roots.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            expected.add(".".join((package, *rel)))
    assert sorted(tool["packages"]) == sorted(expected)
    assert tool["package-data"] == {"vinekv.configs": ["*.toml"]} and list((REPO / "configs").glob("*.toml"))
