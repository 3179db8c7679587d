"""Latency of the interactive API (``samunet.inference.interactive.InteractiveSegmenter``) on the CPU.

    python benchmarks/interactive_latency.py -d 4 -c 2d [--decoder MODEL_FOLDER] [--cases 10] [--clicks 5]

For preprocessed slices of a planned data set (the middle slice with an object of the first ``--cases`` cases of
the decoder's validation set, or of the data set), ``set_image`` encodes the slice once, then per object a box, and
``--clicks`` corrective clicks (the point deepest inside the largest error region, previous logits fed back) are
answered by ``predict``. Reported: median and 90th percentile wall time of ``set_image`` and of one ``predict``
(one click), the thread CPU time of a click, and the load on the machine (other work inflates wall times).
Writes benchmarks/results/interactive_latency.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", required=True)
    p.add_argument("-c", default="2d")
    p.add_argument("--decoder", default=None, help="fine-tuned decoder (model folder or checkpoint)")
    p.add_argument("--fold", default=None)
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", default=str(RESULTS / "interactive_latency"))
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from samunet.inference.interactive import InteractiveSegmenter
    from samunet.paths import preprocessed_folder, resolve_dataset_name
    from samunet.planning.plans import get_configuration, load_plans
    from samunet.preprocessing import prompt_simulation as P
    name = resolve_dataset_name(a.d)
    config = get_configuration(load_plans(name), a.c)
    seg_api = InteractiveSegmenter.from_plans(name, a.c, decoder=a.decoder, fold=a.fold, device="cpu")
    data_dir = preprocessed_folder() / name / config["data_identifier"]
    cases = sorted(p.name[:-5] for p in data_dir.glob("*.json"))
    if a.decoder is not None:
        from samunet.inference.prompted_decoder import decoder_checkpoint
        from samunet.models.run_checkpoint import load_checkpoint
        val = set(load_checkpoint(decoder_checkpoint(a.decoder, a.fold))["val_cases"])
        cases = [c for c in cases if c in val]
    labels = [v for v in load_plans(name)["label_values"] if v != 0]
    t_image, t_click, cpu_click, n_obj = [], [], [], 0
    load = os.getloadavg()[0]
    for case in cases[:a.cases]:
        data = np.load(data_dir / f"{case}.npy", mmap_mode="r")
        seg = np.load(data_dir / f"{case}_seg.npy", mmap_mode="r")
        with_obj = [s for s in range(seg.shape[0]) if np.isin(seg[s], labels).any()]
        if not with_obj:
            continue
        s = with_obj[len(with_obj) // 2]
        t0 = time.perf_counter()
        seg_api.set_image(np.asarray(data[0, s]))
        t_image.append(time.perf_counter() - t0)
        for o in P.find_objects(np.asarray(seg[s]), labels, 10)[0]:
            n_obj += 1
            box, pts, labs, r = P.tight_box(o.mask), [], [], None
            for _ in range(a.clicks + 1):
                c0, w0 = time.thread_time(), time.perf_counter()
                r = seg_api.predict(points=np.array(pts) if pts else None, labels=np.array(labs) if labs else None,
                                    box=box, mask=r)
                t_click.append(time.perf_counter() - w0)
                cpu_click.append(time.thread_time() - c0)
                c = P.correction_click(r.mask, o.mask)
                if c is None:
                    break
                pts.append(c[0])
                labs.append(c[1])
    ms = lambda v, q: 1000 * float(np.percentile(v, q))  # noqa: E731
    res = {"dataset": name, "configuration": a.c, "decoder": a.decoder or "pretrained",
           "encoder_input_size": int(config["encoder_input_size"]), "slices": len(t_image), "objects": n_obj,
           "predict_calls": len(t_click), "set_image_ms_median": ms(t_image, 50), "set_image_ms_p90": ms(t_image, 90),
           "click_ms_median": ms(t_click, 50), "click_ms_p90": ms(t_click, 90),
           "click_thread_cpu_ms_median": ms(cpu_click, 50), "threads": a.threads, "load_before": load,
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(a.o)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = ["# Interactive API latency (CPU)", "", "```", "python benchmarks/interactive_latency.py " +
          " ".join(argv if argv is not None else sys.argv[1:]), "```", "",
          f"{res['slices']} slices, {res['objects']} objects, {res['predict_calls']} predict calls (a box, then up to "
          f"{a.clicks} corrective clicks with the previous logits fed back); {a.threads} threads; load average "
          f"{load:.1f} on {res['cpus']} CPUs before the run; {res['date']}.", "",
          "| step | median | 90th percentile |", "|---|---|---|",
          f"| set_image (encoder, once per image) | {res['set_image_ms_median']:.0f} ms | "
          f"{res['set_image_ms_p90']:.0f} ms |",
          f"| predict (one click) | {res['click_ms_median']:.1f} ms | {res['click_ms_p90']:.1f} ms |",
          f"| predict, thread CPU time | {res['click_thread_cpu_ms_median']:.1f} ms | |", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
