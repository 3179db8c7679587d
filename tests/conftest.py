import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HIPPO = DATA / "Dataset004_Hippocampus"
DRIVE = DATA / "Dataset201_DRIVE"
EM = DATA / "Dataset204_ISBI2012EM"


def require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data set {path.name} not available beside the project (../shared/data)")
    return path


@pytest.fixture
def samunet_dirs(tmp_path, monkeypatch):
    """Fresh samunet_raw / samunet_preprocessed / samunet_results folders for one test."""
    dirs = {k: tmp_path / k for k in ("samunet_raw", "samunet_preprocessed", "samunet_results")}
    for k, v in dirs.items():
        v.mkdir()
        monkeypatch.setenv(k, str(v))
    return dirs


def copy_dataset(src: Path, raw: Path, cases: list[str] | None = None, name: str | None = None) -> Path:
    """Copy a real data set (optionally a subset of its cases) into a samunet_raw folder."""
    require(src)
    meta = json.loads((src / "dataset.json").read_text())
    dst = raw / (name or src.name)
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    ending = meta["file_ending"]
    idents = cases or sorted(p.name[: -len(ending)] for p in (src / "labelsTr").iterdir())
    for ident in idents:
        shutil.copy(src / "labelsTr" / f"{ident}{ending}", dst / "labelsTr")
        for img in sorted((src / "imagesTr").glob(f"{ident}_[0-9][0-9][0-9][0-9]{ending}")):
            shutil.copy(img, dst / "imagesTr")
    meta["numTraining"] = len(idents)
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    return dst


def run_entry(entry, *args, env: dict | None = None, module: str = "samunet.cli") -> subprocess.CompletedProcess:
    """A samunet command (an entry point's name in ``module``, or the function itself) run in this process, as its
    console script runs it but without an interpreter's start-up (seconds each): exit code, stdout and stderr as a
    subprocess gives them; ``env`` replaces the environment for the call. An exception escaping the command becomes a
    traceback on stderr and exit code 1, which the callers' "no traceback" checks catch."""
    import importlib
    import io
    import traceback
    import torch
    func = entry if callable(entry) else getattr(importlib.import_module(module), entry)
    out, err = io.StringIO(), io.StringIO()
    saved, threads = dict(os.environ), torch.get_num_threads()
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                func([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([entry, *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_refused(r, *patterns) -> str:
    """A finished command (``subprocess.CompletedProcess``) must have refused: exit code 1, an ``error: `` line, no
    traceback, no numpy repr leaking into the message, and every one of ``patterns`` in its stderr. Returns stderr."""
    err = r.stderr
    assert r.returncode == 1, (r.returncode, err[-3000:])
    assert "\nerror: " in "\n" + err and "Traceback" not in err, err[-3000:]
    for p in patterns:
        assert p in err, (p, err[-3000:])
    assert "np.float64" not in err and "np.int" not in err, err[-3000:]
    return err


def refused(entry, *args, expect: str) -> str:
    """Run a command (as ``run_entry``) that must refuse with ``expect`` in its error (see ``assert_refused``)."""
    return assert_refused(run_entry(entry, *args), expect)


def hippo_cases(n: int) -> list[str]:
    require(HIPPO)
    return sorted(p.name[: -len(".nii.gz")] for p in (HIPPO / "labelsTr").iterdir())[:n]


def hippo_slab(case: str, dst: Path, n: int = 8) -> Path:
    """The ``n`` middle slices of a real Hippocampus image, cut along its first axis (the slice axis of the plans' 2d
    configuration) with their geometry, written to ``dst``: a real input that predicts in a few seconds."""
    import SimpleITK as sitk
    img = sitk.ReadImage(str(HIPPO / "imagesTr" / f"{case}_0000.nii.gz"))
    first = (img.GetSize()[0] - n) // 2
    sitk.WriteImage(img[first:first + n, :, :], str(dst), True)
    return dst


def predict_slab(case: str, out: Path, *args) -> Path:
    """``samunet_predict`` (in this process, with ``args`` after -i / -o) of ``hippo_slab(case)``, written to ``out``;
    the input lies in ``<out>_in``. Returns ``out``."""
    inp = out.with_name(f"{out.name}_in")
    inp.mkdir()
    hippo_slab(case, inp / f"{case}_0000.nii.gz")
    r = run_entry("predict_entry", "-i", inp, "-o", out, *args)
    assert r.returncode == 0, r.stderr
    return out


def tree_snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def use_folders(root: Path, results: Path | None = None):
    """samunet_raw / samunet_preprocessed / samunet_results under ``root`` (results elsewhere if given) until the
    block ends."""
    env = {k: str(root / k) for k in ("samunet_raw", "samunet_preprocessed", "samunet_results")}
    if results is not None:
        env["samunet_results"] = str(results)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield root
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def planned_hippocampus(root: Path, n_cases: int):
    """The first ``n_cases`` real Hippocampus cases planned and preprocessed (2d) in fresh samunet folders under
    ``root``, with the three environment variables pointing there until the block ends."""
    with use_folders(root):
        for k in ("samunet_raw", "samunet_preprocessed", "samunet_results"):
            (root / k).mkdir()
        copy_dataset(HIPPO, root / "samunet_raw", hippo_cases(n_cases))
        from samunet.plan_and_preprocess import plan_and_preprocess
        plan_and_preprocess(4, num_processes=2, configurations=["2d"])
        yield root


@pytest.fixture(scope="session")
def hippo20(tmp_path_factory):
    """20 real Hippocampus cases planned and preprocessed (2d) once per session, for every module that trains on
    them (fold 0 validates on 4 of them); enter ``use_folders(hippo20)`` to point the samunet folders there. The
    embedding cache built by one module is read by the next."""
    root = tmp_path_factory.mktemp("hippo20")
    with planned_hippocampus(root, 20):
        pass
    return root


# ------------------------------------------------------------------ one trained Hippocampus model for the session
@pytest.fixture(scope="session")
def _hippo_trained(hippo20):
    """20 real cases planned and preprocessed (fold 0 validates on 4 of them); the plans' default head (hybrid: the
    slice and its cached embedding) trained briefly on 4 labelled cases of fold 0, without augmented views, with its
    final validation. Returns (root, trainer, untrained validation Dice)."""
    import numpy as np
    root = hippo20
    with use_folders(root):
        from samunet.training.trainer import Trainer, run_training
        untrained = Trainer(4, "2d", 0, head="hybrid", epochs=1, num_labeled_cases=4, batch_size=8,
                            augmented_views=0)
        untrained.initialize()  # builds the embedding cache for the 4 training and 4 validation cases
        _, dice_before = untrained.validate_epoch()
        t = run_training(4, "2d", 0, head="hybrid", epochs=4, iterations_per_epoch=30, num_labeled_cases=4,
                         batch_size=8, patience=0, augmented_views=0)
    return root, t, float(np.mean(dice_before))


@pytest.fixture
def hippo_env(_hippo_trained, monkeypatch):
    """The session's planned Hippocampus folders, with the three environment variables pointing there."""
    root = _hippo_trained[0]
    for k in ("samunet_raw", "samunet_preprocessed", "samunet_results"):
        monkeypatch.setenv(k, str(root / k))
    return root


@pytest.fixture
def trained(_hippo_trained, hippo_env):
    """(trainer, untrained validation Dice) of the session's hybrid model (fold 0, 4 labelled cases)."""
    return _hippo_trained[1], _hippo_trained[2]


@pytest.fixture(scope="session")
def hippo_cli_prediction(_hippo_trained, tmp_path_factory):
    """``samunet_predict`` (a subprocess, default options) with the session's model on its first validation case:
    (case, input folder, output folder, the command's stderr)."""
    import sys
    root, t, _ = _hippo_trained
    case = t.val_ids[0]
    inp, out = tmp_path_factory.mktemp("cli_in"), tmp_path_factory.mktemp("cli_out")
    shutil.copy(HIPPO / "imagesTr" / f"{case}_0000.nii.gz", inp)
    env = dict(os.environ, **{k: str(root / k) for k in ("samunet_raw", "samunet_preprocessed", "samunet_results")})
    r = subprocess.run([sys.executable, "-c", "from samunet.cli import predict_entry as m; m()", "-i", str(inp),
                        "-o", str(out), "-d", "4", "-c", "2d", "-f", "0", "--num_labeled_cases", "4",
                        "--head", "hybrid"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return case, inp, out, r.stderr
