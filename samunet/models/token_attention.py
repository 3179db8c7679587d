"""SAM's two-way transformer and mask upscaling, computed for a few tokens against a dense image grid.

    queries, keys = two_way_attention(transformer, image_embedding, image_pe, tokens)
        # image_embedding, image_pe: (B, D, h, w); tokens: (B, T, D)  ->  (B, T, D), (B, h*w, D)
    logits = upscale_and_project(output_upscaling, keys, h, w, hyper)
        # keys: (B, h*w, D); hyper: (B, C, D') ->  (B, C, 4h, 4w)
    masks, iou = decode_masks(mask_decoder, image_embeddings, image_pe, sparse, dense, multimask_output)
        # a MaskDecoder with one prompt set per image, every image in one pass: (N, M, 4g, 4g), (N, M)

Same functions, same parameters and the same state dict as segment-anything's ``TwoWayTransformer`` and the mask
decoder's ``output_upscaling`` followed by the hypernetwork product; only the order of the products changes.

Why: in SAM's decoder the T tokens (one per class for the AutoSAM head, a handful for a prompted decoder) and the
N = h*w image tokens meet in three attention layers per block, and segment-anything projects all N image tokens
to the internal width (128) for keys, values, queries and the output. With T * heads well below that width the
same results come from folding the projection into the few tokens instead:

* tokens -> image: the score of a token against image token x is q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x +
  const, so the scores are one product of the N image tokens with H*T folded query vectors; the values enter as
  softmax(scores) @ (X W_v^T + b_v) = (softmax(scores) @ X) W_v^T + b_v, because every row of the softmax sums to 1.
* image -> tokens: the scores (X W_q,h^T + b_q,h) k_h^T = X (W_q,h^T k_h^T) + b_q,h k_h^T, and the output
  projection sum_h attn_h v_h W_o,h^T = attn @ (v_h W_o,h^T)_h, again products of X with H*T columns.

With 3 classes and 8 heads that is 24 columns instead of 128 for each of the image-side products, which is where
the decoder spends its time on a CPU. The upscaling runs channels-last: each stride-2, kernel-2 transposed
convolution is one matrix product followed by a pixel shuffle, and the hypernetwork product is taken before the
last shuffle, on C channels instead of D'. Structures that do not match (more columns than the width, another
upscaling layout) take the original modules' forward.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _foldable(attn: nn.Module, num_tokens: int) -> bool:
    return attn.num_heads * num_tokens < attn.internal_dim


def _heads_weight(linear: nn.Linear, num_heads: int) -> torch.Tensor:
    """(I, D) projection weight -> (H, I/H, D)."""
    out, d = linear.weight.shape
    return linear.weight.view(num_heads, out // num_heads, d)


def tokens_to_image(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment-anything ``Attention(q=tokens, k=image, v=image)``: q (B, T, D), k and v (B, N, D) -> (B, T, D)."""
    b, t, _ = q.shape
    if not _foldable(attn, t):
        return attn(q=q, k=k, v=v)
    h = attn.num_heads
    c = attn.internal_dim // h
    qh = attn.q_proj(q).view(b, t, h, c).transpose(1, 2)                  # (B, H, T, c)
    wk = _heads_weight(attn.k_proj, h)                                       # (H, c, D)
    folded = torch.einsum("bhtc,hcd->bhtd", qh, wk).reshape(b, h * t, -1)    # (B, H*T, D)
    const = torch.einsum("bhtc,hc->bht", qh, attn.k_proj.bias.view(h, c)).reshape(b, h * t, 1)
    scores = (torch.baddbmm(const, folded, k.transpose(1, 2))) / math.sqrt(c)  # (B, H*T, N)
    weights = torch.softmax(scores, dim=-1)
    mixed = torch.bmm(weights, v).view(b, h, t, -1)                          # (B, H, T, D)
    wv = _heads_weight(attn.v_proj, h)
    out = torch.einsum("bhtd,hcd->bthc", mixed, wv).reshape(b, t, h * c) + attn.v_proj.bias
    return attn.out_proj(out)


def image_to_tokens(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment-anything ``Attention(q=image, k=tokens, v=tokens)``: q (B, N, D), k and v (B, T, D) -> (B, N, D)."""
    b, t, _ = k.shape
    if not _foldable(attn, t):
        return attn(q=q, k=k, v=v)
    h = attn.num_heads
    c = attn.internal_dim // h
    kh = attn.k_proj(k).view(b, t, h, c)                                     # (B, T, H, c)
    vh = attn.v_proj(v).view(b, t, h, c)
    wq = _heads_weight(attn.q_proj, h)                                       # (H, c, D)
    folded = torch.einsum("hcd,bthc->bdht", wq, kh).reshape(b, -1, h * t)    # (B, D, H*T)
    const = torch.einsum("hc,bthc->bht", attn.q_proj.bias.view(h, c), kh).reshape(b, 1, h * t)
    scores = torch.baddbmm(const, q, folded) / math.sqrt(c)                  # (B, N, H*T)
    n = scores.shape[1]
    weights = torch.softmax(scores.view(b, n, h, t), dim=-1).view(b, n, h * t)
    wo = attn.out_proj.weight.view(-1, h, c)                                 # (D, H, c)
    values = torch.einsum("bthc,dhc->bhtd", vh, wo).reshape(b, h * t, -1)   # (B, H*T, D)
    return torch.baddbmm(attn.out_proj.bias, weights, values)


def _block(layer: nn.Module, queries, keys, query_pe, key_pe):
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    keys_pe = keys + key_pe
    queries = layer.norm2(queries + tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys_pe, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = keys + image_to_tokens(layer.cross_attn_image_to_token, keys_pe, queries + query_pe, queries)
    return queries, layer.norm4(keys)


def two_way_attention(transformer: nn.Module, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                      tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``transformer(image_embedding, image_pe, tokens)`` of a segment-anything ``TwoWayTransformer``.

    image_embedding, image_pe: (B, D, h, w); tokens: (B, T, D). Returns the tokens (B, T, D) and the image tokens
    (B, h*w, D), channels-last.
    """
    keys = image_embedding.flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    queries = tokens
    for layer in transformer.layers:
        queries, keys = _block(layer, queries, keys, tokens, key_pe)
    out = tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys)
    return transformer.norm_final_attn(queries + out), keys


def _upscaling_layout(upscaling: nn.Module) -> bool:
    """ConvT(2, 2), LayerNorm2d, act, ConvT(2, 2), act: the layout of SAM's mask decoder."""
    mods = list(upscaling)
    if len(mods) != 5:
        return False
    convs_ok = all(isinstance(mods[i], nn.ConvTranspose2d) and tuple(mods[i].kernel_size) == (2, 2)
                   and tuple(mods[i].stride) == (2, 2) and tuple(mods[i].padding) == (0, 0)
                   and mods[i].groups == 1 and mods[i].bias is not None for i in (0, 3))
    norm = mods[1]
    return convs_ok and type(norm).__name__ == "LayerNorm2d" and hasattr(norm, "eps")


def _transposed_conv_rows(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A stride-2, kernel-2 transposed convolution as one product: (..., Cin) -> (rows, (dy, dx, Cout))."""
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, 4 * conv.out_channels)
    return torch.addmm(conv.bias.repeat(4), x.reshape(-1, conv.in_channels), weight)


def _shuffle_up(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """Channels-last stride-2 transposed convolution: (B, h, w, Cin) -> (B, 2h, 2w, Cout)."""
    b, h, w, _ = x.shape
    cout = conv.out_channels
    y = _transposed_conv_rows(x, conv)
    return y.view(b, h, w, 2, 2, cout).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, cout)


def upscale_and_project(upscaling: nn.Module, keys: torch.Tensor, h: int, w: int,
                        hyper: torch.Tensor) -> torch.Tensor:
    """``hyper @ upscaling(keys as (B, D, h, w))``: keys (B, h*w, D), hyper (B, C, D') -> logits (B, C, 4h, 4w)."""
    b, _, d = keys.shape
    if not _upscaling_layout(upscaling):
        up = upscaling(keys.transpose(1, 2).reshape(b, d, h, w))
        return (hyper @ up.flatten(2)).view(b, hyper.shape[1], up.shape[2], up.shape[3])
    conv1, norm, act1, conv2, act2 = list(upscaling)
    x = _shuffle_up(keys.view(b, h, w, d), conv1)                           # (B, 2h, 2w, D/4)
    x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
    cout = conv2.out_channels
    y = act2(_transposed_conv_rows(x, conv2))                                 # (B*2h*2w, 4*D')
    c = hyper.shape[1]
    logits = torch.bmm(y.view(b, -1, cout), hyper.transpose(1, 2))            # (B, 2h*2w*4, C)
    logits = logits.view(b, 2 * h, 2 * w, 2, 2, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, 2h, dy, 2w, dx)
    return logits.reshape(b, c, 4 * h, 4 * w)


def decode_masks(decoder: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                 dense: torch.Tensor, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's ``MaskDecoder`` with one prompt set per image, all images in one pass.

    image_embeddings (N, D, g, g) or (1, D, g, g) shared by all prompt sets; image_pe (1, D, g, g); sparse (N, T, D);
    dense (N, D, g, g). Returns masks (N, M, 4g, 4g) and their predicted IoU (N, M): M = 1 (the first mask token)
    or, with ``multimask_output``, the other mask tokens, as ``MaskDecoder.forward`` selects them.
    """
    n = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
    src = image_embeddings.expand(n, -1, -1, -1) + dense
    _, _, h, w = src.shape
    hs, keys = two_way_attention(decoder.transformer, src, image_pe.expand(n, -1, -1, -1), tokens)
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    masks = upscale_and_project(decoder.output_upscaling, keys, h, w, hyper)
    iou = decoder.iou_prediction_head(hs[:, 0])
    chosen = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, chosen], iou[:, chosen]
