"""The prompted decoder fine-tuned on real Hippocampus cases: box and point Dice rise on held-back cases, the
checkpoint loads safely and only for its encoder, the interactive API gives the batch path's masks, and clicks
correct a trained head's prediction."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import use_folders
from samunet.preprocessing import prompt_simulation as P
from samunet.utils import SamunetError

ZEROSHOT = [sys.executable, "-c", "from samunet.zeroshot.cli import zeroshot_entry as m; m()"]


@pytest.fixture(scope="module")
def finetuned(hippo20, tmp_path_factory):
    """The decoder fine-tuned for 24 steps of 8 objects on 4 labelled cases of fold 0, and the validation Dice of the
    pretrained decoder (box, centre point) on the same 64 objects of the 4 held-back cases."""
    from samunet.models.prompted import PromptedSegmenter
    from samunet.training.prompted_trainer import run_prompted_training
    results = tmp_path_factory.mktemp("prompted_results")
    with use_folders(hippo20, results):
        t = run_prompted_training(4, "2d", 0, epochs=1, iterations_per_epoch=24, num_labeled_cases=4, batch_size=8,
                                  patience=0)
        tuned, t.segmenter = t.segmenter, PromptedSegmenter(t.encoder)
        before = t.validate_epoch()[1]
        t.segmenter = tuned
        yield t, before


def _box_and_point(decoder, cases=None):
    from samunet.zeroshot.evaluate import ZeroShotEvaluator, ZeroShotSettings
    st = ZeroShotSettings(modes=("point1", "box"), clicks=0, jitter=(), slices_per_case=3, cases=cases)
    return ZeroShotEvaluator(4, "2d", device="cpu", settings=st, compare_trained=False, decoder=decoder)


def test_prompt_samples_lie_on_their_object():
    from samunet.training.prompted_data import KINDS, degrade_mask, pad_points, sample_prompts
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 15:45] = True
    valid = np.ones_like(mask)
    for kind in KINDS:
        it = sample_prompts(mask, valid, mask, rng, kind)
        if kind in ("point", "session", "box_point"):
            x, y = it["points"][0].astype(int)
            assert mask[y, x], kind
        if kind == "background":
            x, y = it["points"][0].astype(int)
            assert not mask[y, x] and not it["target"].any() and it["iou_target"] == 0.0
        if kind in ("box", "box_point"):
            assert list(it["box"]) == [15, 20, 44, 39]
        assert it["rounds"] == 0 or kind in ("session", "refine")
    wrong = [degrade_mask(mask, valid, rng) for _ in range(20)]
    assert all(not np.array_equal(w, mask) for w in wrong)
    assert np.mean([P.dice(w, mask) for w in wrong if w.any()]) > 0.5   # wrong, but a plausible prediction
    coords, labels = pad_points([{"points": np.ones((2, 2)), "labels": np.ones(2)}, {"points": None}])
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[1, 1], [-1, -1]]


def test_finetuning_raises_box_and_point_dice_on_held_back_cases(finetuned):
    t, (box_before, point_before) = finetuned
    assert (t.output / "checkpoint_final.pth").is_file() and t.epoch == 1
    assert len(t.train_ids) == 4 and not set(t.train_ids) & set(t.val_ids)
    box_after, point_after = t.log["pseudo_dice_per_class"][-1]   # the same 64 held-back objects
    # measured: box 0.68 -> 0.81, centre point 0.01 -> 0.47
    assert box_after > box_before + 0.02, (box_before, box_after)
    assert point_after > point_before + 0.3, (point_before, point_after)
    # the evaluation a user runs takes the fold's held-back cases and the decoder's input size
    with use_folders(t.pp_folder.parents[1], t.model_dir.parents[1]):
        ev = _box_and_point(t.model_dir)
        assert ev.only_cases == set(t.val_ids) and ev.input_size == 128 and set(ev.choose_cases()) == set(t.val_ids)


def test_decoder_checkpoint_loads_safely_and_only_for_its_encoder(finetuned, tmp_path):
    from samunet.inference.prompted_decoder import load_decoder
    from samunet.models.encoders import build_encoder
    t, _ = finetuned
    ckpt = t.output / "checkpoint_final.pth"
    state = torch.load(ckpt, weights_only=True)       # tensors and plain values only
    assert state["head"] == "prompted" and "image_encoder" not in str(list(state["decoder_state"]))
    segmenter, info = load_decoder(t.model_dir, t.encoder)
    assert info["fold"] == "0" and not any(p.requires_grad for p in segmenter.mask_decoder.parameters())
    with pytest.raises(SamunetError, match="fine-tuned for the encoder lite_medsam at 128 px"):
        load_decoder(ckpt, build_encoder("lite_medsam", input_size=256))
    evil = tmp_path / "checkpoint_final.pth"
    torch.save({**state, "payload": np.dtype}, evil)   # a pickled Python object: never unpickled
    with pytest.raises(SamunetError, match="not a samunet checkpoint"):
        load_decoder(evil, t.encoder)
    with use_folders(t.pp_folder.parents[1], t.model_dir.parents[1]):
        r = subprocess.run(ZEROSHOT + ["-d", "4", "-o", str(tmp_path / "zs"), "--decoder", str(t.model_dir),
                                       "--input_size", "256"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "at 128 px" in r.stderr and "at 256 px" in r.stderr


def test_interactive_api_gives_the_batch_paths_masks(finetuned):
    from samunet.inference.interactive import InteractiveSegmenter
    from samunet.preprocessing.encoder_inputs import make_layout, slice_images
    from samunet.preprocessing.prompt_geometry import SliceGeometry
    t, _ = finetuned
    with use_folders(t.pp_folder.parents[1], t.model_dir.parents[1]):
        ev = _box_and_point(t.model_dir, cases=1)
        case = ev.choose_cases()[0]
        data = np.load(ev.data_dir / f"{case}.npy")
        seg = np.load(ev.data_dir / f"{case}_seg.npy")
        s = ev.choose_slices(seg)[0]
        objects = P.find_objects(seg[s], ev.label_values, 10)[0]
        layout = make_layout(seg[s].shape, ev.zs_config)
        geometry = SliceGeometry(layout, ev.segmenter.low_res_size)
        emb = ev._embed(slice_images(data, s, ev.config)[:1], layout, ev.encoder)
        for name, segmenter in ev.segmenters.items():
            ev.segmenter = segmenter
            api = InteractiveSegmenter(ev.encoder, segmenter)
            api.set_image(data[0, s])
            for o in objects:
                box, centre = P.tight_box(o.mask), np.array([P.centre_point(o.mask)], np.float64)
                low, iou, batch = ev._decode(emb, geometry, boxes=box[None])
                r = api.predict(box=box)
                assert np.array_equal(r.mask, batch[0].numpy()), name
                assert r.iou == pytest.approx(float(iou[0]), abs=1e-5)
                # a corrective click with the previous logits fed back, and a mask prompt from probabilities
                c = P.correction_click(r.mask, o.mask) or ((int(centre[0, 0]), int(centre[0, 1])), 1)
                pts, labs = np.r_[centre, [c[0]]], np.array([1, c[1]])
                batch2 = ev._decode(emb, geometry, points=pts[None], labels=labs[None], boxes=box[None],
                                    mask_input=low)[2]
                assert np.array_equal(api.predict(points=pts, labels=labs, box=box, mask=r).mask, batch2[0].numpy())
                prob = o.mask.astype(np.float32)
                batch3 = ev._decode(emb, geometry, boxes=box[None], mask_input=geometry.mask_prompt(prob[None]))[2]
                assert np.array_equal(api.predict(box=box, mask=prob).mask, batch3[0].numpy())


def test_clicks_correct_a_trained_heads_prediction(finetuned, tmp_path):
    from samunet.training.trainer import Trainer
    t, _ = finetuned
    with use_folders(t.pp_folder.parents[1], t.model_dir.parents[1]):
        # the default head, which reads the slice as well as its embedding; briefly trained: far from perfect, so
        # there is something to correct
        head = Trainer(4, "2d", 0, head="hybrid", epochs=1, iterations_per_epoch=4, num_labeled_cases=4,
                       batch_size=8)
        head.run()
        out = tmp_path / "refine"
        r = subprocess.run(ZEROSHOT + ["-d", "4", "-o", str(out), "--cases", "2", "--slices_per_case", "1",
                                       "--clicks", "3", "--refine", str(head.model_dir), "--decoder",
                                       str(t.model_dir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "refine.json").read_text())
    assert set(summary["decoders"]) == {"pretrained", "finetuned"} and summary["num_objects"] >= 3
    assert not set(summary["cases"]) & set(head.train_ids)
    curve = summary["decoders"]["finetuned"]["mean_dice"]
    assert len(curve) == 4 and curve[3] > curve[0] + 0.1, curve
    assert summary["decoders"]["pretrained"]["mean_dice"][0] == curve[0]   # click 0: the head alone, for both
    assert (out / "refine.md").is_file() and (out / "refine_clicks.png").is_file()
