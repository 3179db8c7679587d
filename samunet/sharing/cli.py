"""``samunet_export_model_to_zip`` and ``samunet_install_pretrained_model_from_zip``, as in nnU-Net v2."""
from __future__ import annotations

import argparse

from samunet.cli import _entry, _setup_logging
from samunet.models.specs import HEADS


@_entry
def export_model_to_zip_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_export_model_to_zip",
                                description="Write trained models (heads' checkpoints, plans, dataset.json, the "
                                            "fingerprint's data set-level parts, the encoder's identity) to a zip "
                                            "file, as nnUNetv2_export_model_to_zip does. The frozen encoder is not "
                                            "included: the receiver needs the same weights.")
    p.add_argument("-d", required=True, help="data set id or name")
    p.add_argument("-o", required=True, help="output file, ending with .zip")
    p.add_argument("-c", nargs="+", default=None, help="configurations (default: every trained one)")
    p.add_argument("--head", nargs="+", default=None, choices=HEADS, help="heads (default: every trained one)")
    p.add_argument("-tr", nargs="+", default=None,
                   help="trainer names as in the results folder, e.g. samunetTrainer_autosam (nnU-Net's -tr)")
    p.add_argument("-p", default="samunetPlans", help="plans name (default samunetPlans)")
    p.add_argument("-f", nargs="+", default=None, help="folds (default: every trained fold)")
    p.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"],
                   help="checkpoint names (default checkpoint_final.pth)")
    p.add_argument("--not_strict", action="store_true", help="skip requested folds or checkpoints that are missing")
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.sharing.export_zip import export_model_to_zip
    m = export_model_to_zip(a.d, a.o, a.c, a.tr, a.head, a.p, a.f, a.chk, strict=not a.not_strict)
    print(f"exported {', '.join(x['folder'] + ' folds ' + ','.join(x['folds']) for x in m['models'])} to {a.o}")


@_entry
def install_pretrained_model_from_zip_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_install_pretrained_model_from_zip",
                                description="Install models from a zip written by samunet_export_model_to_zip into "
                                            "samunet_results. Refuses zips whose encoder is not available here or "
                                            "whose weights differ, entries that would land outside "
                                            "samunet_results, and replacing an installed model without --overwrite.")
    p.add_argument("zip", help="the zip file")
    p.add_argument("--overwrite", action="store_true", help="replace files of an installed model that differ")
    p.add_argument("--checkpoint", default=None,
                   help="local weights file of the encoder (SAM ViT, or a LiteMedSAM file other than the packaged "
                        "one); its SHA-256 must match the one the model was trained with")
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.sharing.install_zip import install_model_from_zip
    m = install_model_from_zip(a.zip, a.overwrite, a.checkpoint)
    print(f"installed {', '.join(x['folder'] for x in m['models'])}")
