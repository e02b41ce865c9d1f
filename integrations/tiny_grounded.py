"""``tiny-grounded``: a LLaVA-family model whose grounding is known by construction.

Every other tiny model (:mod:`vgkernels.integrations.tiny`) has random weights, so its attention
ignores the image's content and a grounding sweep over it shows nothing. This one is a
``LlavaForConditionalGeneration`` (CLIP vision tower, projector, Llama decoder) built
from config objects like ``tiny-llava``, with the same processor classes and chat
template, whose weights are **set by hand, not trained**: a small circuit in a few
heads looks for the colour that the question names and attends to the image tokens
that carry it. Everything outside the circuit keeps its seeded random initialisation, as
in ``tiny-llava``. Built twice with the same seed it is the same model, bit for bit.

Sizes: 112×112 input, 14-pixel patches, so an 8×8 grid of ``N = 64`` image tokens;
decoder of 8 layers × 4 heads (head dim 32, hidden 128, no GQA), RoPE base 10⁶.

The circuit
-----------
Residual stream. The first :data:`CIRCUIT_DIMS` dimensions are the circuit's (named in
``_R``); random heads and MLPs may read them but their output rows for them are zero, so
nothing random ever writes there. Dimension ``bias`` holds a constant ``B = 32`` on
every token, much larger than all other features, so that each layer's RMSNorm divides
every token by (nearly) the same number.

Text tokens (embedding table). Every token carries ``bias`` and ``text``; the colour
words ``red``, ``green``, ``blue``, ``yellow`` — each one token in this model's
vocabulary (tiny-llava's byte-level tokenizer plus these four whole-word tokens, as a
real BPE vocabulary would have) — carry ``word`` and a one-hot of their colour; the
byte ``:`` (the end of ``ASSISTANT:``, hence the last prompt token of every chat
prompt) carries ``ask``.

Image tokens. The vision tower's attention and MLP outputs are zero (``out_proj`` and
``fc2`` weights and biases), so it passes on its embeddings: the patch embedding
averages each of the patch's three channels (the mean colour ``x`` in CLIP-normalised
units) and the position embedding adds the patch's place ``(px, py)``, its cell centre
in units of 4 cells from the image centre, and ``px² + py²``. The projector (its one
GELU) writes ``x``, ``|x|²``, the position features, ``image = 1`` and ``bias`` into the
circuit's image dimensions, and nothing else.

Layers (``(layer, head)`` for heads):

- :data:`COPY_HEAD` ``(1, 0)``, colour copy: from a token carrying ``ask`` it attends to
  the colour words before it (score 12 nats above every other token) and copies their
  one-hot into ``named``. It does not look at the image: over the image its map is
  uniform.
- :data:`COLOUR_HEADS` ``(3, 1)`` and ``(3, 2)``, colour match: with ``p`` the named
  colour (CLIP-normalised) and ``D = |p - grey|²`` its distance from neutral grey, an
  image token with mean colour ``x`` scores ``β·(1 − |x − p|²/D) + ω`` (the cross term
  ``p·x``, ``|x|²`` and the constant are each one query/key dimension), text tokens score
  ``σ``. A patch of the named colour scores ``β`` more than a grey one, a partly covered
  patch in between, a patch of another named colour less. ``β = 5`` for head 1 and
  ``2.5`` for head 2; ``ω = 14``, ``σ = 6``, so that the image holds nearly all the
  mass when a colour is named and nearly none when none is (the reference prompt).
- :data:`GATE_MLP_LAYER` ``2``, coloured-patch mark: six neurons of this layer's MLP (SwiGLU
  products ``silu(gate)·up``) write ``g``, ``g·px`` and ``g·py`` into ``gated``, with
  ``g = clamp((|x − grey|² − 0.05)/0.3, 0, 1)``: 1 on a coloured patch, 0 on grey or noise
  and on text. Head ``(3, 1)``'s value/output then writes ``S = (Σ a·g·px, Σ a·g·py)``
  and ``S1 = Σ a·g`` into ``centroid``: the position of the named colour, without the
  pull of the background's (small but many) attention weights toward the image centre.
- :data:`REGION_HEAD` ``(5, 0)``, object region: with ``S`` and ``S1`` from
  ``centroid``, an image token at ``q = (px, py)`` scores
  ``β₂·(2 q·S − S1·|q|²) = β₂·S1·(|c|² − |q − c|²)`` with ``c = S / S1``: a Gaussian
  around the found colour's centroid, so it also covers the parts of a box that the
  shape does not fill (a circle's corners). Text tokens score ``−8`` (constant), so its
  mass stays on the image for both prompts; with no colour named ``S ≈ 0`` and its map
  is uniform.

:data:`PLANTED_HEADS` are the three heads that ground: ``(3, 1), (3, 2), (5, 0)`` in
:data:`PLANTED_LAYERS` ``(3, 5)``. Queries and keys of the copy, colour and region heads
live only in the head dimensions of the RoPE pairs 10-15 of 16, whose frequencies are
at most ``10⁶^(−20/32) ≈ 1.8e-4`` rad per position: over a prompt of 500 tokens the
rotation changes a score by less than 0.5 %. Their other query/key dimensions are zero;
their values and outputs are zero except for the writes above. All other heads, every
other MLP neuron, the final norm and the LM head keep their random initialisation (with
their writes to the circuit's dimensions removed), so their attention over the image is
close to uniform, like that of ``tiny-llava``, and the generated text is gibberish.

Measured on the demo data (``vgkernels demo``, 32 samples, head-mean maps): layers 3 and
5 have AR 3.42 and 2.52, KL 1.10 and 0.95; every other layer AR 1.00 ± 0.003, KL 1.79
(a uniform map's); the heads' mean KL/ref ranks ``(5, 0)`` 0.51, ``(3, 2)`` 1.06,
``(3, 1)`` 1.29 first, every other head ≥ 1.78; triage with the planted heads keeps 99 %
of the box tokens at p = 50 (random heads: about half).

The token ``:`` is where the question is asked: at any other token the copy head
averages over everything before it and ``named`` stays near zero, so the colour and
region heads do not ground there. Capturing the wrong row therefore shows no grounding.
"""
from __future__ import annotations

import math

import torch

#: The named colours (RGB 0-255) the model knows; the demo draws its shapes in them.
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 220, 40)}
#: Neutral grey (the mean of the demo's noise): a patch of it scores 0 in the colour heads.
GREY = (80, 80, 80)

NUM_LAYERS, NUM_HEADS, HEAD_DIM = 8, 4, 32
HIDDEN = NUM_HEADS * HEAD_DIM
IMAGE_SIZE, PATCH = 112, 14
GRID = IMAGE_SIZE // PATCH
ROPE_THETA = 1e6

COPY_HEAD = (1, 0)
#: The decoder layer whose MLP (six of its neurons) marks the coloured image tokens.
GATE_MLP_LAYER = 2
COLOUR_HEADS = ((3, 1), (3, 2))
REGION_HEAD = (5, 0)
#: The heads that ground by construction, and their layers.
PLANTED_HEADS = COLOUR_HEADS + (REGION_HEAD,)
PLANTED_LAYERS = (3, 5)

# Circuit dimensions of the residual stream.
_R = {"bias": 0, "text": 1, "image": 2, "ask": 3, "word": 4, "word_colour": 5, "named": 9, "colour": 13,
      "sqnorm": 16, "pos": 17, "gated": 20, "centroid": 23}
CIRCUIT_DIMS = 26
_B = 32.0  # the constant of the bias dimension
_COLOUR_SCALE, _SQNORM_SCALE, _R2_SCALE = 0.25, 0.05, 0.5  # residual value = feature * scale
_COPY_SCORE = 12.0
_BETAS = {COLOUR_HEADS[0]: 5.0, COLOUR_HEADS[1]: 2.5}
_OMEGA, _SIGMA = 14.0, 6.0
_REGION_GAMMA = 0.4  # nats per squared cell of distance, per unit of image mass
_REGION_TEXT = -8.0
# Gate of the coloured-patch mark: clamp((|x − grey|² − _GATE_T) / _GATE_W, 0, 1), made of
# two SiLU neurons of slope _GATE_M.
_GATE_T, _GATE_W, _GATE_M = 0.05, 0.3, 100.0
# Head dimensions of the slowest RoPE pairs (pair i rotates dims i and i + HEAD_DIM/2).
_SLOW = [i for i in range(10, 16)] + [i + 16 for i in range(10, 16)]

# Vision stream (CLIP hidden 32): features enter at scale _EPS, balanced by a ±_K pair so
# that the pre-LayerNorm divides every patch by the same standard deviation.
_EPS, _K = 0.1, 8.0
_SHIFT = 10.0  # GELU(z + _SHIFT) - _SHIFT == z within 2e-6 for |z| < 5
_ETA = 0.05  # GELU(ηz) + GELU(−ηz) ≈ sqrt(2/π)·η²·z² for the |x|² feature

_EXTRA_KEYS = ("dtype", "attn_implementation", "max_position_embeddings")


def clip_normalised(rgb) -> torch.Tensor:
    """An RGB triple (0-255) in the CLIP processor's normalised units, float64."""
    from .tiny import CLIP_MEAN, CLIP_STD

    return (torch.tensor(rgb, dtype=torch.float64) / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64)) / torch.tensor(
        CLIP_STD, dtype=torch.float64)


def cell_positions() -> torch.Tensor:
    """``(N, 3)`` float64: ``(px, py, px² + py²)`` of each row-major token, in units of 4 cells
    from the image centre (so ``px, py ∈ [−0.875, 0.875]``)."""
    t = torch.arange(GRID * GRID)
    px = ((t % GRID).double() + 0.5 - GRID / 2) / 4
    py = ((t // GRID).double() + 0.5 - GRID / 2) / 4
    return torch.stack([px, py, px * px + py * py], dim=1)


def expected_colour_scores(pixel_values: torch.Tensor, colours, head=COLOUR_HEADS[0]) -> torch.Tensor:
    """``(B, N)`` float64: the score ``β·(1 − |x − p|²/D)`` a colour head gives each image
    token, from the processor's ``pixel_values (B, 3, 112, 112)`` and the colour named in
    each sample's question (``colours``: B names of :data:`COLOURS`).

    Up to a per-sample constant (``ω`` and the softmax normaliser) this is the log of the
    head's attention over the image: what a correct capture of that head must show.
    """
    if tuple(pixel_values.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"pixel_values: expected (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(pixel_values.shape)}")
    if len(colours) != pixel_values.shape[0]:
        raise ValueError(f"colours: expected one name per sample ({pixel_values.shape[0]}), got {len(colours)}")
    unknown = sorted({c for c in colours if c not in COLOURS})
    if unknown:
        raise ValueError(f"colours: {unknown} are not colours the model knows ({list(COLOURS)})")
    head = tuple(head)
    if head not in _BETAS:
        raise ValueError(f"head: expected one of the colour heads {list(_BETAS)}, got {head!r}")
    x = torch.nn.functional.avg_pool2d(pixel_values.double(), PATCH).flatten(2).transpose(1, 2)  # (B, N, 3)
    grey = clip_normalised(GREY)
    p = torch.stack([clip_normalised(COLOURS[c]) for c in colours])[:, None, :]  # (B, 1, 3)
    D = ((p - grey) ** 2).sum(-1)
    return _BETAS[head] * (1 - ((x - p) ** 2).sum(-1) / D)


def _tokenizer():
    from .tiny import _llava_tokenizer

    return _llava_tokenizer(words=tuple(COLOURS))


def build_grounded(seed: int = 0, **overrides):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` with the planted circuit above.

    Keywords: ``dtype`` (float32), ``attn_implementation`` (``"sdpa"``) and
    ``max_position_embeddings`` (4096); the sizes are fixed by the construction.
    """
    import transformers

    from .tiny import _clip_image_processor, _clip_vision, _finish, _init, _sizes, _text_kwargs, LLAVA_CHAT_TEMPLATE

    bad = sorted(set(overrides) - set(_EXTRA_KEYS))
    if bad:
        raise ValueError(f"build_tiny('tiny-grounded'): unknown or fixed keyword(s) {bad}; the construction fixes "
                         f"the sizes (8 layers x 4 heads, hidden {HIDDEN}, 112-pixel images); accepted: "
                         f"{list(_EXTRA_KEYS)}")
    s = _sizes(dict(overrides, num_layers=NUM_LAYERS, hidden_size=HIDDEN, num_heads=NUM_HEADS,
                    num_kv_heads=NUM_HEADS, intermediate_size=2 * HIDDEN, image_size=IMAGE_SIZE))
    tok = _tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>")}
    text_kw = _text_kwargs(s, len(tok), ids["<pad>"], ids["</s>"], ids["<s>"])
    text_kw["rope_theta"] = ROPE_THETA
    text = transformers.LlamaConfig(**text_kw)
    cfg = transformers.LlavaConfig(
        vision_config=_clip_vision(IMAGE_SIZE, PATCH), text_config=text, image_token_index=ids["<image>"],
        image_seq_length=GRID * GRID, vision_feature_select_strategy="default", vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    cfg.pad_token_id = ids["<pad>"]
    model = _init(transformers.LlavaForConditionalGeneration, cfg, seed, s["attn_implementation"])
    with torch.no_grad():
        _plant(model, tok)
    model = _finish(model, s, seed)
    proc = transformers.LlavaProcessor(
        image_processor=_clip_image_processor(IMAGE_SIZE), tokenizer=tok, patch_size=PATCH,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, proc


# ----------------------------------------------------------------------------- the weights


def _parts(model):
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    lm = getattr(lm, "model", lm)  # a CausalLM in some layouts
    return inner.vision_tower, inner.multi_modal_projector, lm


def _plant(model, tok) -> None:
    vision, projector, lm = _parts(model)
    _plant_vision(vision)
    _plant_projector(projector)
    _plant_text(lm, tok)


def _plant_vision(vision) -> None:
    vm = getattr(vision, "vision_model", vision)
    emb = vm.embeddings
    w = torch.zeros_like(emb.patch_embedding.weight)  # (32, 3, p, p)
    for c in range(3):
        w[c, c] = _EPS / (PATCH * PATCH)  # dims 0-2: +ε·mean colour, dims 6-8: −ε·mean colour
        w[6 + c, c] = -_EPS / (PATCH * PATCH)
    emb.patch_embedding.weight.copy_(w)
    if getattr(emb.patch_embedding, "bias", None) is not None:
        emb.patch_embedding.bias.zero_()
    emb.class_embedding.zero_()
    pos = torch.zeros_like(emb.position_embedding.weight)  # (1 + N, 32); row 0 is CLS
    cp = cell_positions().to(pos.dtype)
    pos[1:, 3:6] = _EPS * cp
    pos[1:, 9:12] = -_EPS * cp
    pos[:, 12], pos[:, 13] = _K, -_K
    emb.position_embedding.weight.copy_(pos)
    # Zero mean by construction; std = sqrt(2K²/32) = K/4 up to the tiny features: undo it.
    vm.pre_layrnorm.weight.fill_(_K / 4)
    vm.pre_layrnorm.bias.zero_()
    for layer in vm.encoder.layers:
        for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()


def _plant_projector(proj) -> None:
    l1, l2 = proj.linear_1, proj.linear_2
    l1.weight.zero_(), l1.bias.zero_(), l2.weight.zero_(), l2.bias.zero_()
    r = _R
    # hidden units 0-2: colour + shift; 3-5: position features + shift; 6-11: ±η·colour.
    for c in range(3):
        l1.weight[c, c] = 1 / _EPS
        l1.bias[c] = _SHIFT
        l2.weight[r["colour"] + c, c] = _COLOUR_SCALE
        l2.bias[r["colour"] + c] = -_SHIFT * _COLOUR_SCALE
        for k, sign in ((6 + 2 * c, 1.0), (7 + 2 * c, -1.0)):
            l1.weight[k, c] = sign * _ETA / _EPS
            l2.weight[r["sqnorm"], k] = _SQNORM_SCALE / (math.sqrt(2 / math.pi) * _ETA ** 2)
    for j, scale in enumerate((1.0, 1.0, _R2_SCALE)):
        l1.weight[3 + j, 3 + j] = 1 / _EPS
        l1.bias[3 + j] = _SHIFT
        l2.weight[r["pos"] + j, 3 + j] = scale
        l2.bias[r["pos"] + j] = -_SHIFT * scale
    l2.bias[r["image"]] = 1.0
    l2.bias[r["bias"]] = _B


def _rms_scale() -> float:
    """What the decoder's RMSNorm multiplies every token by: ``sqrt(d) / |x|`` with ``|x| ≈ B``."""
    return math.sqrt(HIDDEN) / _B


def _head(attn, h: int):
    """Zeroed q/k/v rows and o columns of head ``h``; returns their slices."""
    sl = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        lin.weight[sl] = 0
    attn.o_proj.weight[:, sl] = 0
    return sl.start


def _qk(attn, h0: int, slot: int, q_terms: dict, k_terms: dict) -> None:
    """Score term ``(Σ q_terms[dim]·feature) · (Σ k_terms[dim]·feature)`` in one slow RoPE dim.

    ``q_terms``/``k_terms`` map a residual dim to the coefficient of its **raw value**
    (before the RMSNorm); the softmax scale ``1/sqrt(head_dim)`` is folded into the query.
    """
    s = _rms_scale()
    d = h0 + _SLOW[slot]
    for dim, c in q_terms.items():
        attn.q_proj.weight[d, dim] = c * math.sqrt(HEAD_DIM) / s
    for dim, c in k_terms.items():
        attn.k_proj.weight[d, dim] = c / s


def _plant_text(lm, tok) -> None:
    r, s = _R, _rms_scale()
    emb = lm.embed_tokens.weight
    emb[:, :CIRCUIT_DIMS] = 0
    emb[:, r["bias"]] = _B
    emb[:, r["text"]] = 1.0
    emb[tok.convert_tokens_to_ids(":"), r["ask"]] = 1.0
    for c, name in enumerate(COLOURS):
        t = tok.convert_tokens_to_ids(name)
        emb[t, r["word"]] = 1.0
        emb[t, r["word_colour"] + c] = 1.0
    for layer in lm.layers:  # nothing random writes into the circuit
        layer.self_attn.o_proj.weight[:CIRCUIT_DIMS] = 0
        layer.mlp.down_proj.weight[:CIRCUIT_DIMS] = 0

    # Copy head: "ask" tokens attend to colour words; value = the word's one-hot -> "named".
    attn = lm.layers[COPY_HEAD[0]].self_attn
    h0 = _head(attn, COPY_HEAD[1])
    _qk(attn, h0, 0, {r["ask"]: _COPY_SCORE}, {r["word"]: 1.0})
    for c in range(len(COLOURS)):
        attn.v_proj.weight[h0 + c, r["word_colour"] + c] = 1 / s
        attn.o_proj.weight[r["named"] + c, h0 + c] = 1.0

    # Colour heads: β(1 − |x − p|²/D) + ω on image tokens, σ on text tokens.
    grey = clip_normalised(GREY)
    for (layer, head) in COLOUR_HEADS:
        beta = _BETAS[(layer, head)]
        attn = lm.layers[layer].self_attn
        h0 = _head(attn, head)
        cross = [{} for _ in range(3)]
        sq, const = {}, {}
        for c, rgb in enumerate(COLOURS.values()):
            p = clip_normalised(rgb)
            D = float(((p - grey) ** 2).sum())
            for i in range(3):
                cross[i][r["named"] + c] = float(2 * beta * p[i] / D)
            sq[r["named"] + c] = -beta / D
            const[r["named"] + c] = beta * (1 - float((p * p).sum()) / D) + _OMEGA
        for i in range(3):
            _qk(attn, h0, i, cross[i], {r["colour"] + i: 1 / _COLOUR_SCALE})
        _qk(attn, h0, 3, sq, {r["sqnorm"]: 1 / _SQNORM_SCALE})
        _qk(attn, h0, 4, const, {r["image"]: 1.0})
        _qk(attn, h0, 5, {r["bias"]: _SIGMA / _B}, {r["text"]: 1.0})
    # Layer-2 MLP: six neurons write the coloured-patch mark g and g·px, g·py into "gated".
    mlp = lm.layers[GATE_MLP_LAYER].mlp
    n_int = mlp.gate_proj.weight.shape[0]
    neurons = list(range(n_int - 6, n_int))
    mlp.gate_proj.weight[neurons] = 0
    mlp.up_proj.weight[neurons] = 0
    mlp.down_proj.weight[:, neurons] = 0
    # |x − grey|² = |x|² − 2 grey·x + |grey|² (an image token's features, times "image")
    sat = {r["sqnorm"]: 1 / _SQNORM_SCALE, r["image"]: float((grey * grey).sum()) - _GATE_T}
    for i in range(3):
        sat[r["colour"] + i] = -2 * float(grey[i]) / _COLOUR_SCALE
    span = _GATE_M * _GATE_W
    for j, up_dim in enumerate((r["pos"], r["pos"] + 1, r["image"])):
        for n, shift, sign in ((neurons[2 * j], 0.0, 1.0), (neurons[2 * j + 1], span, -1.0)):
            for dim, c in sat.items():
                mlp.gate_proj.weight[n, dim] = _GATE_M * c / s
            mlp.gate_proj.weight[n, r["image"]] -= shift / s
            mlp.up_proj.weight[n, up_dim] = sign / (span * s)
            mlp.down_proj.weight[r["gated"] + j, n] = 1.0
    # The first colour head writes (Σ a·g·px, Σ a·g·py, Σ a·g) over the image into "centroid".
    attn = lm.layers[COLOUR_HEADS[0][0]].self_attn
    h0 = COLOUR_HEADS[0][1] * HEAD_DIM
    for j, dim in enumerate((r["gated"], r["gated"] + 1, r["gated"] + 2)):
        attn.v_proj.weight[h0 + j, dim] = 1 / s
        attn.o_proj.weight[r["centroid"] + j, h0 + j] = 1.0

    # Region head: β₂(2 q·S − S1·|q|²) on image tokens (positions in units of 4 cells).
    beta2 = _REGION_GAMMA * 16
    attn = lm.layers[REGION_HEAD[0]].self_attn
    h0 = _head(attn, REGION_HEAD[1])
    _qk(attn, h0, 0, {r["centroid"]: 2 * beta2}, {r["pos"]: 1.0})
    _qk(attn, h0, 1, {r["centroid"] + 1: 2 * beta2}, {r["pos"] + 1: 1.0})
    _qk(attn, h0, 2, {r["centroid"] + 2: -beta2}, {r["pos"] + 2: 1 / _R2_SCALE})
    _qk(attn, h0, 3, {r["bias"]: _REGION_TEXT / _B}, {r["text"]: 1.0})
