"""The pretrained and a fine-tuned decoder side by side: ``comparison.md`` / ``comparison.json`` and a plot.

Both runs evaluate the same slices with the same prompts (``samunet_zeroshot --decoder``); each keeps its own
full report in ``pretrained/`` and ``finetuned/``.
"""
from __future__ import annotations

from pathlib import Path

from samunet.utils import atomic_write_bytes, save_json
from samunet.zeroshot.evaluate import CLICK_TARGETS
from samunet.zeroshot.report import MODE_TITLES, _f, _mode_columns

NAMES = {"pretrained": "pretrained", "finetuned": "fine-tuned"}


def comparison(summaries: dict) -> dict:
    """Per prompt mode, click and shift: the mean Dice of each decoder."""
    first = next(iter(summaries.values()))
    st = first["settings"]
    out = {"dataset": first["dataset"], "configuration": first["configuration"], "encoder": first["encoder"],
           "encoder_input_size": first["encoder_input_size"], "num_objects": first["num_objects"],
           "num_slices": first["num_slices"], "cases": first["cases"],
           "decoder": summaries.get("finetuned", {}).get("decoder"), "modes": {}, "clicks": {}, "box_shift": {},
           "point_shift": {}}
    for name, s in summaries.items():
        for c in _mode_columns(st["modes"]):
            out["modes"].setdefault(c, {})[name] = s["dice_per_mode"][c]["mean"]
        if "clicks" in s:
            out["clicks"][name] = s["clicks"]
        out["box_shift"][name] = s["box_shift"]
        out["point_shift"][name] = s["point_shift"]
    return out


def _plot(comp: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, c in comp["clicks"].items():
        ax.plot(range(1, len(c["mean_dice"]) + 1), c["mean_dice"], "o-", label=f"{NAMES[name]} decoder")
    for t in CLICK_TARGETS:
        ax.axhline(t, color="grey", lw=0.5)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean Dice per object")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(comp: dict, command: str | None) -> str:
    names = list(comp["modes"][next(iter(comp["modes"]))])
    head = "| | " + " | ".join(f"{NAMES[n]} decoder" for n in names) + " |"
    rule = "|---|" + "---|" * len(names)
    dec = comp["decoder"] or {}
    lines = [f"# Pretrained and fine-tuned decoder, {comp['encoder']} on {comp['dataset']} ({comp['configuration']})",
             ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"{comp['num_objects']} objects on {comp['num_slices']} slices of {len(comp['cases'])} cases of the "
              f"validation set of fold {dec.get('fold')}, encoder input {comp['encoder_input_size']} px, the same "
              f"prompts for both decoders. Fine-tuned: {dec.get('trainer')} ({dec.get('epoch')} epochs x "
              f"{dec.get('iterations_per_epoch')} iterations x batch {dec.get('batch_size')}). Full reports: "
              "[pretrained](pretrained/report.md), [fine-tuned](finetuned/report.md).", "",
              "## Mean Dice per prompt mode (per object)", "", head.replace("| |", "| mode |"), rule]
    for c, v in comp["modes"].items():
        lines.append(f"| {MODE_TITLES.get(c, c)} | " + " | ".join(_f(v[n]) for n in names) + " |")
    if comp["clicks"]:
        k = len(next(iter(comp["clicks"].values()))["mean_dice"])
        lines += ["", "## Interactive clicks", "", "Click 1 is the centre point; each next click goes deepest into "
                  "the largest error region, with the previous low-resolution logits fed back.", "",
                  "| decoder | " + " | ".join(f"{i + 1} click{'s' if i else ''}" for i in range(k)) + " |",
                  "|---|" + "---|" * k]
        for n, c in comp["clicks"].items():
            lines.append(f"| {NAMES[n]} | " + " | ".join(_f(x) for x in c["mean_dice"]) + " |")
        lines += ["", "| decoder | " + " | ".join(f"reach {t:.2f} (NoC)" for t in CLICK_TARGETS) + " |",
                  "|---|" + "---|" * len(CLICK_TARGETS)]
        for n, c in comp["clicks"].items():
            lines.append(f"| {NAMES[n]} | " + " | ".join(
                f"{100 * c[f'reached_{int(t * 100)}']:.0f}% ({_f(c[f'noc_{int(t * 100)}'], 2)})"
                for t in CLICK_TARGETS) + " |")
    for key, title in (("box_shift", "box shifted by d px"), ("point_shift", "centre point displaced by d px")):
        ds = list(next(iter(comp[key].values())))
        lines += ["", f"## Robustness: {title}", "", "| decoder | " + " | ".join(f"d = {d}" for d in ds) + " |",
                  "|---|" + "---|" * len(ds)]
        for n, v in comp[key].items():
            lines.append(f"| {NAMES[n]} | " + " | ".join(_f(v[d]) for d in ds) + " |")
    if comp["clicks"]:
        lines += ["", "![clicks](dice_vs_clicks_decoders.png)"]
    lines.append("")
    return "\n".join(lines)


def write_comparison(out, summaries: dict, command: str | None = None) -> dict:
    out = Path(out)
    comp = comparison(summaries)
    if command:
        comp["command"] = command
    save_json(comp, out / "comparison.json")
    if comp["clicks"]:
        _plot(comp, out / "dice_vs_clicks_decoders.png")
    atomic_write_bytes(out / "comparison.md", markdown(comp, command).encode("utf-8"))
    return comp
