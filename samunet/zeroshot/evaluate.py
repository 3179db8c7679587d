"""Zero-shot evaluation of SAM-type models on the preprocessed slices of a planned data set.

For each chosen slice the encoder runs once; its embedding serves every prompt mode, every simulated prompt,
every corrective click and the 'everything' grid. Prompts are simulated per object (class x connected
component) from the ground truth (`samunet.preprocessing.prompt_simulation`); masks are mapped back to the slice
grid and scored there with Dice, so numbers do not depend on the encoder's input size.

Prompt modes: ``everything`` (automatic masks, matched to each object by best Dice and by predicted IoU),
``point1`` (centre point), ``points5`` (5 random foreground points), ``points5_neg5`` (plus 5 negative points
from the box enlarged 2x), ``box`` (tight box), ``box_jitter`` (each box edge moved by Gaussian noise of
``box_noise`` x the box side), ``box_point`` (tight box and centre point). A single point is ambiguous, so
for SAM point-only prompts use multimask output and keep the mask with the highest predicted IoU (SAM's
recommendation); every other prompt asks for one mask. Models whose multimask outputs were never trained
(LiteMedSAM: distilled with box prompts and a single output) use their single output throughout, unless
``multimask`` says otherwise.

Trained heads of the same data set and configuration (``samunet_results``) are evaluated on the same slices,
but only on cases of their fold's validation set, never on their training cases.

With a fine-tuned decoder (``decoder``: what ``samunet_finetune_prompted`` wrote) the same slices and prompts are
evaluated with the pretrained and the fine-tuned decoder (``run("pretrained")``, ``run("finetuned")``), only on
cases of the validation set of the fold it was fine-tuned on, at the input size it was fine-tuned at; the
fine-tuned decoder uses its single (trained) output throughout.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from samunet.paths import preprocessed_folder, resolve_dataset_name
from samunet.planning.plans import get_configuration, load_plans
from samunet.preprocessing.encoder_inputs import encoder_inputs, make_layout, slice_images
from samunet.preprocessing.prompt_geometry import SliceGeometry
from samunet.utils import SamunetError
from samunet.preprocessing import prompt_simulation as P
from samunet.zeroshot.automatic import AutomaticSettings, automatic_masks, match_object
from samunet.zeroshot.trained_heads import load_trained_heads, trained_folds

logger = logging.getLogger("samunet")

MODES = ("everything", "point1", "points5", "points5_neg5", "box", "box_jitter", "box_point")
SINGLE_OUTPUT_ENCODERS = ("lite_medsam",)   # only the first (single-mask) output token was trained
CLICK_TARGETS = (0.80, 0.85, 0.90)


@dataclass
class ZeroShotSettings:
    modes: tuple = MODES
    jitter: tuple = (0, 1, 2, 4, 8)        # box shifts and centre-point displacements, slice pixels
    box_noise: float = 0.1                 # box_jitter mode: edge noise std relative to the box side
    clicks: int = 5
    num_points: int = 5
    min_size: int = 10                     # objects with fewer pixels are skipped (and counted)
    seed: int = 0
    cases: int | None = None
    slices_per_case: int | None = 3
    multimask: bool | None = None          # None: multimask for single points if the model has trained it
    automatic: AutomaticSettings = field(default_factory=AutomaticSettings)

    def __post_init__(self):
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise SamunetError(f"unknown prompt mode(s) {', '.join(unknown)} (choose from {', '.join(MODES)})")
        if self.clicks < 0:
            raise SamunetError("--clicks must be >= 0 (0: no interactive correction; click 1 is the centre point)")
        if any(j < 0 for j in self.jitter):
            raise SamunetError("--jitter distances must be >= 0 pixels")


def _select(out, multimask: bool):
    """Best mask (by predicted IoU) of each prompt when multimask, else the single one: low-res logits
    (N, 1, L, L) and predicted IoU (N,)."""
    if multimask:
        best = out.iou.argmax(1)
        idx = torch.arange(len(best))
        return out.low_res[idx, best][:, None], out.iou[idx, best]
    return out.low_res[:, :1], out.iou[:, 0]


class ZeroShotEvaluator:
    def __init__(self, dataset, configuration: str = "2d", encoder: str | None = None, checkpoint=None,
                 input_size: int | None = None, device: str = "auto", settings: ZeroShotSettings | None = None,
                 compare_trained: bool = True, decoder=None, decoder_fold=None):
        from samunet.models.encoders import build_encoder, encoder_identity
        from samunet.models.prompted import PromptedSegmenter
        from samunet.models.specs import get_encoder_spec
        from samunet.models.for_plans import cpu_precision, resolve_device
        self.settings = settings or ZeroShotSettings()
        self.dataset_name = resolve_dataset_name(dataset)
        self.plans = load_plans(self.dataset_name)
        self.configuration = configuration
        self.config = get_configuration(self.plans, configuration)
        if self.config["inplane_mode"] != "resize":
            raise SamunetError(
                f"configuration '{configuration}' of {self.dataset_name} uses in-plane mode "
                f"'{self.config['inplane_mode']}'; zero-shot evaluation needs whole slices resized to the encoder "
                "input (inplane_mode 'resize'), since a prompt must see its whole object. Plan the data set with "
                "a larger --input_size so that slices are resized, or evaluate another configuration.")
        self.pp = preprocessed_folder() / self.dataset_name
        self.data_dir = self.pp / self.config["data_identifier"]
        if not self.data_dir.is_dir():
            raise SamunetError(f"{self.data_dir}: preprocessed data not found; run samunet_preprocess -d "
                               f"{self.dataset_name} -c {configuration}")
        self.label_values = sorted(self.plans["label_values"])
        self.class_names = dict(zip(self.plans["label_values"], self.plans.get("class_names",
                                                                                 map(str, self.plans["label_values"]))))
        self.device = resolve_device(device)
        plan_encoder = self.plans["encoder"]
        self.encoder_name = encoder or plan_encoder["name"]
        if checkpoint is None and self.encoder_name == plan_encoder["name"]:
            checkpoint = plan_encoder.get("checkpoint")
        spec = get_encoder_spec(self.encoder_name)
        self.decoder_state, self.only_cases = None, None
        if decoder is not None:   # the decoder's own input size unless another is asked for (and then refused)
            from samunet.inference.prompted_decoder import decoder_checkpoint
            from samunet.models.run_checkpoint import load_checkpoint
            state = load_checkpoint(decoder_checkpoint(decoder, decoder_fold))
            input_size = input_size or (state.get("encoder_identity") or {}).get("input_size")
            if state.get("dataset_name") != self.dataset_name:
                raise SamunetError(f"{decoder}: decoder fine-tuned on {state.get('dataset_name')}, not on "
                                   f"{self.dataset_name}; its validation cases are not this data set's")
            self.only_cases = set(state.get("val_cases", []))
        self.input_size = int(input_size or spec.native_input_size)
        try:
            same = self.encoder_name == plan_encoder["name"]  # the plan's encoder runs on the plan's CPU path
            self.encoder = build_encoder(self.encoder_name, checkpoint=checkpoint, input_size=self.input_size,
                                         device=self.device,
                                         optimise=cpu_precision(self.plans, self.device) if same else
                                         self.device.type == "cpu")
        except (ValueError, FileNotFoundError) as e:
            raise SamunetError(f"cannot build encoder '{self.encoder_name}': {e}") from None
        if self.encoder.prompt_encoder is None:
            raise SamunetError(f"encoder '{self.encoder_name}' has no pretrained prompt encoder / mask decoder")
        self.segmenter = PromptedSegmenter(self.encoder)
        self.segmenters = {"pretrained": self.segmenter}
        if decoder is not None:
            from samunet.inference.prompted_decoder import load_decoder
            self.segmenters["finetuned"], self.decoder_state = load_decoder(decoder, self.encoder, decoder_fold)
        self.zs_config = dict(self.config, encoder_input_size=self.input_size)
        st = self.settings
        if st.multimask is None:
            st.multimask = self.encoder_name not in SINGLE_OUTPUT_ENCODERS
        st.automatic.multimask = st.multimask
        self.pretrained_multimask = st.multimask
        self.identity = encoder_identity(self.encoder)
        self.trained = load_trained_heads(self.dataset_name, self.plans, self.configuration, self.encoder,
                                          self.encoder_name, self.input_size, self.device) if compare_trained else []

    # ----------------------------------------------------------------------------------------------- choice
    def choose_cases(self) -> list[str]:
        """Cases in a seeded order; validation cases of trained folds first, so the trained heads can be
        compared on as many of the chosen cases as possible."""
        ids = sorted(p.name[:-len(".json")] for p in self.data_dir.glob("*.json"))
        if self.only_cases is not None:   # a fine-tuned decoder: only its fold's validation cases
            ids = [i for i in ids if i in self.only_cases]
        if not ids:
            raise SamunetError(f"{self.data_dir}: no preprocessed cases" + (
                " of the decoder's validation set" if self.only_cases is not None else ""))
        rng = np.random.default_rng(self.settings.seed)
        # the same cases whether or not the trained heads are compared in this run
        found, splits = trained_folds(self.dataset_name, self.plans, self.configuration)
        folds = {int(f.name[len("fold_"):]) for _, f in found}
        val = set().union(*(set(splits[k]["val"]) for k in folds if k < len(splits))) if folds else set()
        if self.only_cases is not None:
            val = self.only_cases
        first = [i for i in ids if i in val]
        rest = [i for i in ids if i not in val]
        order = [first[i] for i in rng.permutation(len(first))] + [rest[i] for i in rng.permutation(len(rest))]
        n = self.settings.cases
        return order if n is None else order[:n]

    def choose_slices(self, seg: np.ndarray) -> list[int]:
        """Slices with at least one object large enough; ``slices_per_case`` of them at the centres of equal
        parts of that range (one slice: the middle one, not an edge slice with a sliver of the object)."""
        with_obj = [s for s in range(seg.shape[0]) if P.find_objects(seg[s], self.label_values,
                                                                     self.settings.min_size)[0]]
        k = self.settings.slices_per_case
        if k is None or len(with_obj) <= k:
            return with_obj
        idx = ((np.arange(k) + 0.5) * len(with_obj) / k).astype(int)
        return [with_obj[i] for i in idx]

    # ------------------------------------------------------------------------------------------------ run
    def _embed(self, images: np.ndarray, layout: dict, encoder) -> torch.Tensor:
        x = encoder_inputs(images, layout)[0].to(self.device)   # (n_enc, 3, P, P)
        e = encoder(x).float()
        return e.reshape(1, -1, *e.shape[2:])

    def _decode(self, emb, geometry, *, points=None, labels=None, boxes=None, mask_input=None, multimask=False):
        out = self.segmenter.predict_prompts(
            emb, None if points is None else geometry.points(points),
            None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64),
            None if boxes is None else geometry.boxes(boxes), mask_input, multimask_output=multimask)
        low, iou = _select(out, multimask)
        return low, iou, geometry.logits_to_slice(low)[:, 0] > 0

    def evaluate_slice(self, case: str, s: int, data: np.ndarray, seg: np.ndarray) -> tuple[list, list, dict]:
        st = self.settings
        seg_s = np.asarray(seg[s])
        objects, skipped = P.find_objects(seg_s, self.label_values, st.min_size)
        info = {"skipped": skipped, "automatic": None}
        if not objects:
            return [], [], info
        rng = np.random.default_rng([st.seed, zlib.crc32(case.encode()), s])
        images = slice_images(data, s, self.config)
        layout = make_layout(seg_s.shape, self.zs_config)
        geometry = SliceGeometry(layout, self.segmenter.low_res_size)
        emb = self._embed(images[:1], layout, self.encoder)   # one image: SAM takes a single RGB image
        image0 = np.asarray(data[0, s], np.float64)
        n = len(objects)
        # prompts, drawn in a fixed order per object so that a seed fixes them all
        pr = {"centre": [], "rand": [], "neg": [], "box": [], "noisy": [], "box_shift": [], "pt_shift": []}
        for o in objects:
            c = np.array(P.centre_point(o.mask), np.float64)
            pr["centre"].append(c)
            pr["rand"].append(P.random_points(o.mask, st.num_points, rng))
            pr["neg"].append(P.negative_points(o.mask, st.num_points, rng))
            b = P.tight_box(o.mask)
            pr["box"].append(b)
            pr["noisy"].append(P.noisy_box(b, st.box_noise, rng))
            pr["box_shift"].append([P.shift_box(b, d, rng) for d in st.jitter])
            pr["pt_shift"].append([P.shift_point(c, d, rng) for d in st.jitter])
        centre = np.stack(pr["centre"])[:, None]          # (n, 1, 2)
        box = np.stack(pr["box"])
        preds: dict[str, np.ndarray] = {}
        first_click = None
        if "point1" in st.modes or st.clicks:
            low, iou, m = self._decode(emb, geometry, points=centre, labels=np.ones((n, 1)),
                                       multimask=st.multimask)
            preds["point1"], first_click = m.numpy(), (low, m.numpy().copy())
        if "points5" in st.modes:
            preds["points5"] = self._decode(emb, geometry, points=np.stack(pr["rand"]),
                                            labels=np.ones((n, st.num_points)))[2].numpy()
        if "points5_neg5" in st.modes:
            pts = np.concatenate([np.stack(pr["rand"]), np.stack(pr["neg"])], 1)
            lab = np.concatenate([np.ones((n, st.num_points)), np.zeros((n, st.num_points))], 1)
            preds["points5_neg5"] = self._decode(emb, geometry, points=pts, labels=lab)[2].numpy()
        if "box" in st.modes or st.jitter:
            preds["box"] = self._decode(emb, geometry, boxes=box)[2].numpy()
        if "box_jitter" in st.modes:
            preds["box_jitter"] = self._decode(emb, geometry, boxes=np.stack(pr["noisy"]))[2].numpy()
        if "box_point" in st.modes:
            preds["box_point"] = self._decode(emb, geometry, points=centre, labels=np.ones((n, 1)),
                                              boxes=box)[2].numpy()
        # robustness sweeps (distance 0 is the unshifted prompt)
        shifted = [d for d in st.jitter if d > 0]
        box_sweep = {0: preds.get("box")}
        pt_sweep = {0: preds.get("point1")}
        if shifted:
            j = [st.jitter.index(d) for d in shifted]
            bb = np.stack([pr["box_shift"][i][k] for k in j for i in range(n)])
            pp = np.stack([pr["pt_shift"][i][k] for k in j for i in range(n)])[:, None]
            mb = self._decode(emb, geometry, boxes=bb)[2].numpy()
            mp = self._decode(emb, geometry, points=pp, labels=np.ones((len(pp), 1)),
                              multimask=st.multimask)[2].numpy()
            for t, d in enumerate(shifted):
                box_sweep[d] = mb[t * n:(t + 1) * n]
                pt_sweep[d] = mp[t * n:(t + 1) * n]
        # interactive correction
        click_dice = self._clicks(emb, geometry, objects, centre, first_click) if st.clicks else None
        # everything mode
        auto = None
        if "everything" in st.modes:
            auto = automatic_masks(self.segmenter, emb, geometry, st.automatic, [o.mask for o in objects])
            info["automatic"] = {k: auto[k] for k in ("candidates", "after_iou", "after_stability", "after_nms",
                                                      "max_pred_iou")}
        rows = []
        for i, o in enumerate(objects):
            row = {"case": case, "slice": s, "label": o.label, "class": self.class_names.get(o.label, str(o.label)),
                   "component": o.component, **P.object_factors(o.mask, image0),
                   "box_width": int(box[i, 2] - box[i, 0] + 1), "box_height": int(box[i, 3] - box[i, 1] + 1)}
            for m in st.modes:
                if m == "everything":
                    r = match_object(o.mask, auto["masks"], auto["iou"])
                    row["everything_oracle"] = r["oracle"]
                    row["everything_pred_iou"] = r["pred_iou"]
                    row["everything_overlapping"] = r["overlapping"]
                    row["everything_unfiltered_oracle"] = float(auto["unfiltered_oracle"][i])
                else:
                    row[m] = P.dice(preds[m][i], o.mask)
            if click_dice is not None:
                for k in range(st.clicks):
                    row[f"click_{k + 1}"] = click_dice[i][k]
                for t in CLICK_TARGETS:
                    reached = [k + 1 for k in range(st.clicks) if click_dice[i][k] >= t]
                    row[f"clicks_to_{int(t * 100)}"] = reached[0] if reached else float("nan")
            for d in st.jitter:
                if box_sweep.get(d) is not None:
                    row[f"box_shift_{d}"] = P.dice(box_sweep[d][i], o.mask)
                if pt_sweep.get(d) is not None:
                    row[f"point_shift_{d}"] = P.dice(pt_sweep[d][i], o.mask)
            rows.append(row)
        slice_rows = self._slice_rows(case, s, seg_s, objects, preds, auto, images, emb, data)
        return rows, slice_rows, info

    def _clicks(self, emb, geometry, objects, centre, first_click) -> list[list[float]]:
        """Dice after each click: click 1 is the centre point; each next click goes to the point deepest inside
        the largest error region, with all previous clicks and the previous low-res logits as prompts."""
        st = self.settings
        n = len(objects)
        low, masks = first_click
        pts = [list(map(tuple, centre[:, 0]))[i:i + 1] for i in range(n)]
        labs = [[1] for _ in range(n)]
        dices = [[P.dice(masks[i], objects[i].mask)] for i in range(n)]
        active = list(range(n))
        for _ in range(1, st.clicks):
            still = []
            for i in active:
                c = P.correction_click(masks[i], objects[i].mask)
                if c is None:   # perfect: nothing left to correct
                    continue
                pts[i].append(c[0])
                labs[i].append(c[1])
                still.append(i)
            done = [i for i in active if i not in still]
            for i in done:
                dices[i].append(dices[i][-1])
            active = still
            if not active:
                continue
            new_low, _, new_masks = self._decode(
                emb, geometry, points=np.array([pts[i] for i in active], np.float64),
                labels=np.array([labs[i] for i in active]), mask_input=low[active])
            low = low.clone()
            low[active] = new_low
            for k, i in enumerate(active):
                masks[i] = new_masks[k].numpy()
                dices[i].append(P.dice(masks[i], objects[i].mask))
        return dices

    def _slice_rows(self, case, s, seg_s, objects, preds, auto, images, zs_emb, data) -> list[dict]:
        """Per (slice, class): Dice of the union of the objects' masks of that class against the class mask, for
        each prompted mode and for the trained heads whose validation set holds this case."""
        from samunet.inference.predictor import slice_probabilities
        from samunet.preprocessing.encoder_inputs import probabilities_to_slice
        trained_pred = {}
        layout = make_layout(seg_s.shape, self.config)
        embeddings = {}
        for t in self.trained:
            if case not in t["val"]:
                continue
            if not t["on_embedding"]:   # the hybrid head, the U-Net, 2.5d_emb heads: the predictor on the slice
                probs = slice_probabilities(data, s, self.config, t["encoder"], [t["head"]],
                                            len(self.label_values), self.device)
                trained_pred[t["name"]] = np.asarray(self.label_values)[probs.argmax(0)]
                continue
            key = id(t["encoder"])
            if key not in embeddings:   # the zero-shot embedding is reused when it is the same input
                same = t["encoder"] is self.encoder and len(images) == 1
                embeddings[key] = zs_emb if same else self._embed(images, layout, t["encoder"])
            with torch.no_grad():
                probs = probabilities_to_slice(t["head"](embeddings[key]).float().cpu(), layout)
            trained_pred[t["name"]] = np.asarray(self.label_values)[probs.argmax(0).numpy()]
        rows = []
        for value in sorted({o.label for o in objects}):
            gt = seg_s == value
            idx = [i for i, o in enumerate(objects) if o.label == value]
            row = {"case": case, "slice": s, "label": value, "class": self.class_names.get(value, str(value)),
                   "objects": len(idx), "class_area": int(gt.sum())}
            for m, masks in preds.items():
                row[m] = P.dice(np.any(masks[idx], 0), gt)
            if auto is not None:
                chosen = [match_object(objects[i].mask, auto["masks"], auto["iou"]).get("pred_iou_index", -1)
                          for i in idx]
                union = np.zeros_like(gt)
                for c in chosen:
                    if c >= 0:
                        union |= auto["masks"][c]
                row["everything_pred_iou"] = P.dice(union, gt)
            for name, lab in trained_pred.items():
                row[f"trained_{name}"] = P.dice(lab == value, gt)
            rows.append(row)
        return rows

    def run(self, decoder: str = "pretrained") -> dict:
        """Every chosen slice with the ``decoder`` named (``pretrained``, or ``finetuned`` with a decoder)."""
        st = self.settings
        self.segmenter = self.segmenters[decoder]
        st.multimask = self.pretrained_multimask if decoder == "pretrained" else False
        st.automatic.multimask = st.multimask
        cases = self.choose_cases()
        t0 = time.time()
        work = []
        for case in cases:
            seg = np.load(self.data_dir / f"{case}_seg.npy", mmap_mode="r")
            work += [(case, s) for s in self.choose_slices(np.asarray(seg))]
        if not work:
            raise SamunetError(f"no slice of the {len(cases)} chosen case(s) holds an object of at least "
                               f"{st.min_size} pixels (lower --min_size or choose more --cases)")
        objects, slices, skipped, auto = [], [], [], []
        loaded: dict = {}
        for case, s in tqdm(work, desc="zero-shot slices"):
            if case not in loaded:
                loaded = {case: (np.load(self.data_dir / f"{case}.npy", mmap_mode="r"),
                                 np.load(self.data_dir / f"{case}_seg.npy", mmap_mode="r"))}
            data, seg = loaded[case]
            rows, srows, info = self.evaluate_slice(case, s, data, seg)
            objects += rows
            slices += srows
            skipped += [{"case": case, "slice": s, **k} for k in info["skipped"]]
            if info["automatic"] is not None:
                auto.append(info["automatic"])
        return {"objects": objects, "slices": slices, "skipped": skipped, "automatic": auto,
                "cases": cases, "num_slices": len(work), "seconds": time.time() - t0}

    def describe(self) -> dict:
        st = self.settings
        return {"dataset": self.dataset_name, "configuration": self.configuration, "encoder": self.encoder_name,
                "encoder_input_size": self.input_size, "plans_input_size": int(self.config["encoder_input_size"]),
                "native_input_size": int(self.encoder.spec.native_input_size),
                "weights_sha256": self.identity["weights_sha256"], "device": str(self.device),
                "settings": {**{k: v for k, v in asdict(st).items() if k != "automatic"},
                             "automatic": asdict(st.automatic)},
                "trained_models": [{"name": t["name"], "trainer": t["trainer"], "fold": t["fold"]}
                                   for t in self.trained],
                "decoder": "pretrained" if self.segmenter is self.segmenters["pretrained"] else {
                    k: self.decoder_state.get(k) for k in ("checkpoint", "trainer", "fold", "epoch", "num_epochs",
                                                           "iterations_per_epoch", "batch_size")}}
