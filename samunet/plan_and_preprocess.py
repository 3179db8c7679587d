"""API behind samunet_extract_fingerprint, samunet_plan_experiment, samunet_preprocess and
samunet_plan_and_preprocess. Each function takes a data set id or name and works in the samunet folders."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from samunet.dataset.dataset_json import load_dataset_json, training_cases
from samunet.dataset.integrity import verify_dataset_integrity
from samunet.paths import preprocessed_folder, raw_folder, resolve_dataset_name
from samunet.planning.fingerprint import compute_fingerprint
from samunet.planning.plans import get_configuration, load_plans, plans_file
from samunet.planning.planner import PLANS_NAME, plan_experiment
from samunet.preprocessing.preprocessor import preprocess_cases
from samunet.preprocessing.size_checks import resampling_problem
from samunet.utils import SamunetError, check_writable_folder, load_json, save_json, temp_path

logger = logging.getLogger("samunet")


def _raw_dataset_folder(dataset) -> tuple[str, Path]:
    name = resolve_dataset_name(dataset)
    folder = raw_folder() / name
    if not folder.is_dir():
        raise SamunetError(f"{folder}: raw data set not found (samunet_raw={raw_folder()})")
    return name, folder


def extract_fingerprint(dataset, num_processes: int = 2, verify: bool = False, clean: bool = False) -> dict:
    """Write ``dataset_fingerprint.json`` (and a copy of ``dataset.json``) to the preprocessed folder.

    With ``verify`` the raw data set is checked first; if it fails, nothing is written.
    An existing fingerprint is reused unless ``clean``.
    """
    name, folder = _raw_dataset_folder(dataset)
    out = check_writable_folder(preprocessed_folder() / name, "samunet_preprocessed")
    if verify:
        verify_dataset_integrity(folder, num_processes)
    else:
        load_dataset_json(folder)
    fp_file = out / "dataset_fingerprint.json"
    if fp_file.is_file() and not clean:
        logger.info("using the existing fingerprint %s (pass --clean to recompute it)", fp_file)
        return load_json(fp_file)
    fingerprint = compute_fingerprint(folder, num_processes)
    save_json(load_json(folder / "dataset.json"), out / "dataset.json")
    save_json(fingerprint, fp_file)
    logger.info("fingerprint written to %s", fp_file)
    return fingerprint


def plan(dataset, encoder: str = "lite_medsam", checkpoint: str | None = None, memory_gb: float = 8.0,
         disk_gb: float = 50.0, input_size: int | None = None, head: str | None = None,
         cpu_precision: str = "fp32") -> dict:
    """Plan every configuration the data allow and write ``samunetPlans.json``."""
    name = resolve_dataset_name(dataset)
    out = preprocessed_folder() / name
    fp_file = out / "dataset_fingerprint.json"
    if not fp_file.is_file():
        raise SamunetError(f"{fp_file}: fingerprint not found; run samunet_extract_fingerprint -d {name} first")
    if checkpoint and not Path(checkpoint).is_file():
        raise SamunetError(f"{checkpoint}: checkpoint file not found (--checkpoint)")
    plans = plan_experiment(load_json(fp_file), load_json(out / "dataset.json"), encoder=encoder,
                            checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None,
                            memory_gb=memory_gb, disk_gb=disk_gb, input_size=input_size, head=head,
                            cpu_precision=cpu_precision)
    save_json(plans, plans_file(name))
    for cname, cfg in plans["configurations"].items():
        logger.info("%s: slice axis %d, input %d px (%s), head %s, batch %d, cache %s (%.2f GB)", cname,
                    cfg["slice_axis"], cfg["encoder_input_size"], cfg["inplane_mode"], cfg["head"],
                    cfg["batch_size"], cfg["cache_embeddings"], cfg["estimated_cache_gb"])
    return plans


def _check_sizes(plans: dict, fingerprint: dict, configurations, memory_gb, files: dict) -> None:
    """Refuse, before any case is preprocessed, cases whose resampling the fingerprint shows would not fit."""
    if "spacings" not in fingerprint:
        return
    problems = []
    idents = fingerprint.get("case_identifiers", [])
    for cname in configurations or list(plans["configurations"]):
        cfg = get_configuration(plans, cname)
        t = cfg["transpose_forward"]
        for i, (sp, sh) in enumerate(zip(fingerprint["spacings"], fingerprint["shapes_after_crop"])):
            ident = idents[i] if i < len(idents) else str(i)
            p = resampling_problem(files.get(ident, f"case {ident}"), [sh[a] for a in t],
                                   [sp[a] for a in t], cfg["target_spacing_inplane"], fingerprint["num_channels"],
                                   memory_gb)
            if p and p not in problems:
                problems.append(p)
    if problems:
        raise SamunetError(f"{len(problems)} case(s) cannot be preprocessed, nothing was written:\n  - "
                           + "\n  - ".join(problems))


def preprocess(dataset, configurations: list[str] | None = None, num_processes: int = 2,
               plans_name: str = PLANS_NAME) -> dict[str, list[str]]:
    """Preprocess the training cases for each configuration (configurations sharing data are done once)."""
    name, folder = _raw_dataset_folder(dataset)
    plans = load_plans(name, plans_name)
    info = load_dataset_json(folder)
    cases = training_cases(info)
    missing = [str(c.label_file) for c in cases if not c.label_file.is_file()]
    if missing:
        raise SamunetError("label file(s) missing: " + ", ".join(missing))
    out = check_writable_folder(preprocessed_folder() / name, "samunet_preprocessed")
    fingerprint = load_json(out / "dataset_fingerprint.json") if (out / "dataset_fingerprint.json").is_file() else {}
    dims = fingerprint["dims"][0] if len(fingerprint.get("dims", [])) == 1 else None
    memory_gb = plans.get("budgets", {}).get("memory_gb")
    _check_sizes(plans, fingerprint, configurations, memory_gb, {c.identifier: c.image_files[0] for c in cases})
    gt = out / "gt_segmentations"
    gt.mkdir(parents=True, exist_ok=True)
    for c in cases:
        target = gt / c.label_file.name
        if not target.is_file():
            tmp = temp_path(target)
            shutil.copyfile(c.label_file, tmp)
            tmp.replace(target)
    done: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    for cname in configurations or list(plans["configurations"]):
        cfg = get_configuration(plans, cname)
        key = (cfg["data_identifier"], cfg["preprocessing_identity"])
        if key in seen:
            logger.info("%s shares its preprocessed data with an earlier configuration", cname)
            continue
        seen.add(key)
        done[cname] = preprocess_cases(cases, cfg, plans["label_values"], out / cfg["data_identifier"],
                                       num_processes, desc=f"preprocess {name} {cname}", dims=dims,
                                       memory_gb=memory_gb)
    return done


def plan_and_preprocess(dataset, verify: bool = False, num_processes: int = 2, no_pp: bool = False,
                        clean: bool = False, configurations: list[str] | None = None, **plan_options) -> dict:
    extract_fingerprint(dataset, num_processes, verify, clean)
    plans = plan(dataset, **plan_options)
    for c in configurations or []:
        get_configuration(plans, c)
    if not no_pp:
        preprocess(dataset, configurations, num_processes)
    return plans


__all__ = ["extract_fingerprint", "plan", "preprocess", "plan_and_preprocess", "PLANS_NAME"]
