"""``samunet_cache_embeddings``: build a configuration's frozen-encoder embedding cache ahead of training, in parts.

The cases are split into ``num_parts`` parts (``cases[part_id::num_parts]``, sorted by name), so parts can run at the
same time on several devices or machines that see the same ``samunet_preprocessed`` folder; under torchrun each
process is one part (its rank of ``WORLD_SIZE``) on its own GPU. Every case is written by ``EmbeddingCache``
atomically under a unique temporary name, JSON last, so parts never clash and a case is either complete or absent;
the encoder works on one case at a time, so the cache does not depend on how the cases were split: a cache built in
parts is byte for byte the one a single process builds. ``samunet_train`` then finds every case encoded.
"""
from __future__ import annotations

import logging

from samunet.models.encoders import encoder_identity
from samunet.models.for_plans import build_encoder_for_plans
from samunet.paths import preprocessed_folder, resolve_dataset_name
from samunet.planning.plans import get_configuration, load_plans
from samunet.preprocessing.embedding_cache import EmbeddingCache
from samunet.training.distributed import check_parts, local_device, shard, torch_run_parts
from samunet.training.splits import get_split, labeled_subset
from samunet.utils import SamunetError, load_json

logger = logging.getLogger("samunet")


def cases_to_cache(dataset_name: str, config: dict, fold=None, num_labeled_cases: int | None = None,
                   seed: int = 12345) -> list[str]:
    """Every preprocessed case, or with ``fold`` the cases that fold's training reads (its labelled training subset
    and its validation cases), sorted."""
    pp = preprocessed_folder() / dataset_name
    ids = load_json(pp / "dataset_fingerprint.json")["case_identifiers"]
    data_dir = pp / config["data_identifier"]
    missing = [i for i in ids if not (data_dir / f"{i}.json").is_file()]
    if missing:
        raise SamunetError(f"{data_dir}: {len(missing)} case(s) are not preprocessed (e.g. {missing[0]}); run "
                           f"samunet_preprocess -d {dataset_name} first")
    if fold is None:
        return sorted(ids)
    fold = "all" if str(fold) == "all" else int(fold)
    train, val = get_split(pp, ids, fold)
    return sorted(set(labeled_subset(train, num_labeled_cases, fold, seed)) | set(val))


def parts_from(num_parts: int | None, part_id: int | None) -> tuple[int, int, int]:
    """``(num_parts, part_id, local_rank)``: as given, or torchrun's ``(WORLD_SIZE, RANK, LOCAL_RANK)``."""
    rank, world, local = torch_run_parts()
    if num_parts is None and part_id is None:
        return world, rank, local
    if world > 1:
        raise SamunetError("-num_parts / -part_id split the work by hand; under torchrun each process is already "
                           f"one part (rank {rank} of {world}): leave them out")
    num_parts, part_id = int(num_parts if num_parts is not None else 1), int(part_id if part_id is not None else 0)
    check_parts(num_parts, part_id)
    return num_parts, part_id, 0


def cache_embeddings(dataset, configuration: str, fold=None, num_parts: int | None = None,
                     part_id: int | None = None, device: str = "auto", plans_name: str = "samunetPlans",
                     num_labeled_cases: int | None = None, ram_budget_mb: float = 4000.0) -> dict:
    """Encode this part's cases of ``configuration`` into the embedding cache (those already cached are kept).
    Returns ``{"folder", "part_id", "num_parts", "cases", "encoded_inputs"}``."""
    num_parts, part_id, local = parts_from(num_parts, part_id)
    name = resolve_dataset_name(dataset)
    plans = load_plans(name, plans_name)
    config = get_configuration(plans, configuration)
    cases = shard(cases_to_cache(name, config, fold, num_labeled_cases), part_id, num_parts)
    dev = local_device(device, local)
    encoder = build_encoder_for_plans(plans, config, dev)
    cache = EmbeddingCache(preprocessed_folder() / name, configuration, config, encoder_identity(encoder),
                           plans["label_values"])
    n = cache.build(cases, encoder, ram_budget_mb)
    logger.info("embedding cache part %d of %d: %d case(s), %d encoder input(s) computed, in %s", part_id,
                num_parts, len(cases), n, cache.folder)
    return {"folder": str(cache.folder), "part_id": part_id, "num_parts": num_parts, "cases": cases,
            "encoded_inputs": n}
