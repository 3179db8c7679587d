"""Loading plans and picking a configuration, with errors that say what to run."""
from __future__ import annotations

from pathlib import Path

from samunet.paths import preprocessed_folder
from samunet.planning.planner import PLANS_NAME
from samunet.planning.plans_checks import check_plans
from samunet.utils import SamunetError, load_json


def plans_file(dataset_name: str, plans_name: str = PLANS_NAME) -> Path:
    return preprocessed_folder() / dataset_name / f"{plans_name}.json"


def load_plans(dataset_name: str, plans_name: str = PLANS_NAME) -> dict:
    path = plans_file(dataset_name, plans_name)
    if not path.is_file():
        raise SamunetError(f"{path}: plans not found; run samunet_plan_and_preprocess -d {dataset_name} first")
    return check_plans(load_json(path), path)


def get_configuration(plans: dict, name: str) -> dict:
    try:
        return plans["configurations"][name]
    except KeyError:
        raise SamunetError(f"configuration '{name}' is not in the plans of {plans['dataset_name']} "
                           f"(available: {', '.join(plans['configurations'])})") from None


def case_limits(folder: Path, plans: dict) -> tuple[int | None, float | None]:
    """What every new case is checked against before resampling (``preprocess_case``'s ``dims`` and ``memory_gb``):
    the data set's dimensionality, where ``folder``'s ``dataset_fingerprint.json`` knows a single one, and the
    plans' memory budget."""
    fingerprint = Path(folder) / "dataset_fingerprint.json"
    dims = load_json(fingerprint).get("dims", []) if fingerprint.is_file() else []
    return (dims[0] if len(dims) == 1 else None), plans.get("budgets", {}).get("memory_gb")
