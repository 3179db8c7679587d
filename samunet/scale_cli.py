"""Entry points and launch helpers for runs over several processes, devices and machines.

``samunet_cache_embeddings`` builds the embedding cache in parts; ``samunet_train -num_gpus N`` and
``samunet_predict -num_parts P -part_id I`` (in ``cli.py``) come here to start processes or pick their part.
Under torchrun every command reads its rank from the environment (``samunet.training.distributed``).
"""
from __future__ import annotations

import argparse

from samunet.cli import _entry, _setup_logging


def train_processes(num_gpus: int | None, device: str, **kwargs) -> None:
    """``samunet_train``'s work in one process, or with ``-num_gpus N`` in N processes started here (as torchrun
    would start them; DistributedDataParallel over gloo on CPUs, nccl on GPUs)."""
    from samunet.training.trainer import run_training
    if num_gpus is None or (num_gpus == 1 and device != "cpu"):
        run_training(device=device, **kwargs)
        return
    from samunet.training.distributed import spawn
    spawn(int(num_gpus), device, run_training, {**kwargs, "device": device})


def predict_parts(num_parts: int | None, part_id: int | None, device: str) -> tuple[int, int]:
    """``(num_parts, part_id)`` for samunet_predict: as given, or under torchrun one part per process, on the
    process's own GPU."""
    from samunet.training.cache_parts import parts_from
    from samunet.training.distributed import local_device
    num_parts, part_id, local = parts_from(num_parts, part_id)
    if local:
        local_device(device, local)  # makes cuda:LOCAL_RANK the process's current device
    return num_parts, part_id


@_entry
def cache_embeddings_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_cache_embeddings",
                                description="Encode a configuration's cases into the frozen-encoder embedding cache "
                                            "ahead of training, optionally as one of several parts (-num_parts / "
                                            "-part_id, or one part per process under torchrun) that may run at the "
                                            "same time on devices or machines sharing samunet_preprocessed.")
    p.add_argument("-d", required=True, help="data set id or name")
    p.add_argument("-c", required=True, help="configuration (2d, 2.5d; 2.5d_emb reads the 2d cache)")
    p.add_argument("-f", default=None, help="only the cases fold F trains and validates on (default: every case)")
    p.add_argument("-p", default="samunetPlans", help="plans name (default samunetPlans)")
    p.add_argument("--num_labeled_cases", type=int, default=None,
                   help="with -f: only the fold's labelled subset of N cases (as samunet_train uses it)")
    p.add_argument("-num_parts", type=int, default=None, help="split the cases into this many parts (default 1)")
    p.add_argument("-part_id", type=int, default=None, help="the part this run encodes, 0..num_parts-1")
    p.add_argument("--device", "-device", dest="device", default="auto", choices=["auto", "cpu", "cuda"])
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.training.cache_parts import cache_embeddings
    r = cache_embeddings(a.d, a.c, a.f, a.num_parts, a.part_id, a.device, a.p, a.num_labeled_cases)
    print(f"part {r['part_id']} of {r['num_parts']}: {len(r['cases'])} case(s), {r['encoded_inputs']} encoder "
          f"input(s) computed; cache {r['folder']}")
