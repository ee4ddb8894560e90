"""One run, one folder (even for launches in the same instant), and result files that respect the umask."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from datetime import datetime
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import jei.run_dir
from jei.io import atomic_write, write_json
from jei.run_dir import unique_dir

FROZEN = datetime(2030, 1, 2, 3, 4, 5, 678901)
STEM = "2030-01-02_03-04-05_678901"

# A Hydra app on jei-train's own config that only reports its run folder; the clock is frozen so
# that both launches pick the same name, the case the one-second names of before got wrong.
APP = textwrap.dedent(
    f"""
    import sys
    from datetime import datetime

    import hydra
    from hydra.core.hydra_config import HydraConfig

    import jei.run_dir

    jei.run_dir.clock = lambda: datetime({FROZEN.year}, {FROZEN.month}, {FROZEN.day}, {FROZEN.hour}, {FROZEN.minute},
                                         {FROZEN.second}, {FROZEN.microsecond})


    @hydra.main(config_path="pkg://jei.configs", config_name="train", version_base="1.3")
    def main(cfg):
        print("OUTPUT_DIR=" + HydraConfig.get().runtime.output_dir, flush=True)


    main()
    """
)


def launch_together(tmp_path: Path, *args: str, copies: int = 2) -> list[list[Path]]:
    """Start ``copies`` launches at once in ``tmp_path``; the output folders each reported."""
    script = tmp_path / "app.py"
    script.write_text(APP)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HYDRA_FULL_ERROR": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(copies)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outputs.append([Path(line.split("=", 1)[1]) for line in out.splitlines() if line.startswith("OUTPUT_DIR=")])
    return outputs


def test_the_config_names_run_and_sweep_folders_with_the_unique_resolver():
    cfg = OmegaConf.load(Path(jei.run_dir.__file__).parents[1] / "configs" / "train.yaml")
    assert cfg.hydra.run._get_node("dir")._value() == "${jei.unique_dir:outputs/${task_name}}"
    assert cfg.hydra.sweep._get_node("dir")._value() == "${jei.unique_dir:multirun/${task_name}}"


@pytest.mark.slow
def test_two_runs_launched_at_the_same_moment_get_different_folders(tmp_path):
    (first,), (second,) = launch_together(tmp_path)
    assert first != second
    parent = (tmp_path / "outputs" / "train").resolve()
    assert {first.parent, second.parent} == {parent}
    assert sorted([first.name, second.name]) == [STEM, f"{STEM}-2"]
    for folder in (first, second):  # each run wrote its own Hydra record there
        assert (folder / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in parent.iterdir()) == [STEM, f"{STEM}-2"]  # no stray folders


@pytest.mark.slow
def test_two_sweeps_launched_at_the_same_moment_get_different_folders(tmp_path):
    first, second = launch_together(tmp_path, "-m", "seed=1,2")
    sweeps = {job.parent for job in first}, {job.parent for job in second}
    assert all(len(s) == 1 for s in sweeps)  # the jobs of one sweep share its folder ...
    assert sweeps[0] != sweeps[1]  # ... and two sweeps never do
    assert sorted(job.name for job in first) == sorted(job.name for job in second) == ["0", "1"]
    parent = (tmp_path / "multirun" / "train").resolve()
    assert sorted(p.name for p in parent.iterdir()) == [STEM, f"{STEM}-2"]


def test_simultaneous_resolutions_in_threads_never_share_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(jei.run_dir, "clock", lambda: FROZEN)
    barrier, folders = threading.Barrier(8), []

    def resolve() -> None:
        barrier.wait()
        folders.append(unique_dir(tmp_path / "outputs"))

    threads = [threading.Thread(target=resolve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(folders)) == 8
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == sorted(
        [STEM, *(f"{STEM}-{k}" for k in range(2, 9))]
    )


def test_an_existing_folder_is_never_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(jei.run_dir, "clock", lambda: FROZEN)
    (tmp_path / STEM).mkdir()
    (tmp_path / STEM / "metrics.json").write_text("{}")
    assert Path(unique_dir(tmp_path)) == tmp_path / f"{STEM}-2"
    assert (tmp_path / STEM / "metrics.json").read_text() == "{}"


def test_the_resolver_gives_one_folder_per_launch_config(tmp_path):
    cfg = OmegaConf.create({"a": f"${{jei.unique_dir:{tmp_path}}}", "b": "${a}"})
    assert cfg.a == cfg.b == cfg.a  # cached: every use within one config is the same folder
    assert len(list(tmp_path.iterdir())) == 1


def test_an_unwritable_run_parent_names_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=r"cannot create a run folder under .*file.*hydra\.run\.dir="):
        unique_dir(blocker / "outputs")


# --- result files and the umask ------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_result_files_get_the_mode_the_umask_allows(tmp_path, umask, mask):
    from jei.plots import plot_exit_histogram

    umask(mask)
    expected = 0o666 & ~mask
    written = [
        write_json(tmp_path / "metrics.json", {"accuracy": 1.0}),
        atomic_write(tmp_path / "exits.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp))),
        atomic_write(tmp_path / "state.pt", lambda tmp: torch.save({"w": torch.zeros(2)}, tmp)),
    ]
    plot_exit_histogram({"exit_fractions": [0.5, 0.5], "accuracy": 0.9, "expected_cost": 0.5}, tmp_path / "hist.png")
    written.append(tmp_path / "hist.png")
    assert {path.name: oct(mode(path)) for path in written} == {path.name: oct(expected) for path in written}
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"accuracy": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temporary files


def test_json_results_stay_strict_json_with_non_finite_floats(tmp_path):
    from jei.io import with_non_finite

    data = {"threshold": [0.5, float("inf"), float("-inf")], "nested": {"x": float("nan")}, "name": "inf"}

    def strict(constant):
        raise ValueError(f"not strict JSON: {constant}")

    written = json.loads(write_json(tmp_path / "m.json", data).read_text(), parse_constant=strict)
    assert written == {"threshold": [0.5, "inf", "-inf"], "nested": {"x": "nan"}, "name": "inf"}
    back = with_non_finite(written)
    assert back["threshold"] == [0.5, float("inf"), float("-inf")] and back["nested"]["x"] != back["nested"]["x"]


def test_a_rewritten_result_file_gets_the_umask_mode_too(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "metrics.json"
    target.write_text("{}")
    target.chmod(0o600)
    write_json(target, {"a": 1})
    assert mode(target) == 0o644


def test_a_run_linked_to_a_cached_backbone_leaves_the_entrys_mode_alone(tmp_path, umask):
    """A run's ``backbone.safetensors`` may be a hard link to the backbone cache's entry: a run
    under a stricter umask must not change the mode of the entry (and of every run linked to it)."""
    from jei.backbone_cache import place

    umask(0o022)
    entry = atomic_write(tmp_path / "cache" / "entry.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
    earlier = tmp_path / "run_a" / "backbone.safetensors"
    place(entry, earlier)
    umask(0o077)
    later = tmp_path / "run_b" / "backbone.safetensors"
    how = place(entry, later)
    assert mode(entry) == mode(earlier) == 0o644
    assert mode(later) == (0o644 if how == "linked" else 0o600)
    assert load_file(str(later))["w"].shape == (2,)


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(tmp_path / "metrics.json", fail)
    assert list(tmp_path.iterdir()) == []
