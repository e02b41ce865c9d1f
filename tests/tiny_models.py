"""The tests' one set of tiny-model helpers: models, inputs, and the eager references.

The references here are written independently of :mod:`vgkernels.integrations.patch`:

- image spans are found from the token ids (HF families) or from the stand-in's own
  splice (splice family), not through the shims;
- the knockout reference is the authors' method: eager attention in float64 with an
  additive ``-inf`` mask on (knocked-out image keys) × (query rows from the first text
  token after the image to the last prompt token), or for ``mode="zero"`` the softmax
  multiplied by the keep mask without renormalising.
"""
from __future__ import annotations

import copy

import torch

from vgkernels.integrations.tiny import IMAGE_TOKEN_INDEX, build_tiny, test_image

HF_NAMES = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl"]
SPLICE_NAMES = ["tiny-splice", "tiny-splice-vila"]
ALL_NAMES = HF_NAMES + SPLICE_NAMES

PROMPTS = ["What?", "Describe the image in detail, please.", "Where is the lesion?"]
# (width, height): different sizes give different token counts for NeXT and Qwen.
SIZES = [(80, 60), (64, 96), (100, 100)]

TOL = dict(atol=2e-5, rtol=1e-5)  # float32 logits: eager vs sdpa already differ by ~3e-7
MAP_TOL = dict(atol=1e-6, rtol=1e-5, equal_nan=True)


_MODELS: dict = {}


def models(name: str, **sizes):
    """``(model (sdpa), processor, eager twin with the same weights)`` of a built-in tiny
    model (``build_tiny`` keywords in ``sizes``), built once per process and shared by every
    test file; a test that changes a model's settings restores them."""
    key = (name, tuple(sorted(sizes.items())))
    if key not in _MODELS:
        model, proc = build_tiny(name, seed=0, **sizes)
        ref, _ = build_tiny(name, seed=0, attn_implementation="eager", **sizes)
        ref.load_state_dict(model.state_dict())
        _MODELS[key] = (model, proc, ref)
    return _MODELS[key]


def is_splice(name: str) -> bool:
    return name.startswith("tiny-splice")


def decoder_layers(name: str, model):
    if name == "tiny-splice-vila":
        return list(model.llm.model.layers)
    if name == "tiny-splice":
        return list(model.model.layers)
    return list(model.model.language_model.layers)


def image_token_id(name, model):
    return model.config.image_token_id if "qwen" in name else model.config.image_token_index


def make_inputs(name, proc, prompts, sizes, padding_side="left", with_image=True, seed=0):
    msgs = lambda t: [{"role": "user", "content": ([{"type": "image"}] if with_image else []) +
                       [{"type": "text", "text": t}]}]
    texts = [proc.apply_chat_template(msgs(t), add_generation_prompt=True) for t in prompts]
    images = [test_image(w, h, seed=seed + i) for i, (w, h) in enumerate(sizes)] if with_image else None
    if is_splice(name):
        return proc(images=images, text=texts, padding_side=padding_side)
    proc.tokenizer.padding_side = padding_side
    try:
        return proc(images=images, text=texts, return_tensors="pt", padding=True)
    finally:
        proc.tokenizer.padding_side = "left"


def gradient_image(width: int, height: int):
    """R = 255·x/w, G = 255·y/h at pixel centres, B = 128: each pixel's colour says where it is."""
    from PIL import Image

    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width * 255
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height * 255
    img = torch.zeros(height, width, 3)
    img[..., 0] = xs[None, :]
    img[..., 1] = ys[:, None]
    img[..., 2] = 128
    return Image.fromarray(img.round().to(torch.uint8).numpy(), "RGB")


def expected_spans(name, model, inputs):
    """``[(key_start, N)]`` per sample and the ``(B, S)`` bool mask the LLM sees,
    computed from the inputs alone."""
    if is_splice(name):
        ids, am = inputs["input_ids"], inputs["attention_mask"].bool()
        feats = model.encode_images(inputs["images"])
        n = feats.shape[1]
        real_len = [int(am[b].sum()) - 1 + n for b in range(ids.shape[0])]
        S = max(real_len)
        left = getattr(model.config, "tokenizer_padding_side", "right") == "left"
        spans, mask = [], torch.zeros(ids.shape[0], S, dtype=torch.bool)
        for b in range(ids.shape[0]):
            real = ids[b][am[b]]
            k = int(torch.nonzero(real == IMAGE_TOKEN_INDEX)[0])
            first = S - real_len[b] if left else 0
            mask[b, first: first + real_len[b]] = True
            spans.append((first + k, n))
        return spans, mask
    ids, am = inputs["input_ids"], inputs["attention_mask"].bool()
    tok = image_token_id(name, model)
    spans = []
    for b in range(ids.shape[0]):
        pos = torch.nonzero((ids[b] == tok) & am[b]).flatten()
        spans.append((int(pos[0]), int(pos.numel())))
        assert int(pos[-1]) - int(pos[0]) + 1 == pos.numel()
    return spans, am


def column_to_row(n: int):
    """For VILA's column-major order: row-major token t sits at sequence offset perm[t]."""
    g = int(round(n ** 0.5))
    t = torch.arange(n)
    return (t % g) * g + t // g


def eager_rows(name, model, inputs, spans, mask):
    """``(B, L, H, N_max)`` rows of ``output_attentions=True`` at each sample's last real
    token over its image span, NaN-padded, row-major."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    att = out.attentions
    B, L = len(spans), len(att)
    H = att[0].shape[1]
    n_max = max(n for _, n in spans)
    rows = torch.full((B, L, H, n_max), float("nan"))
    for b, (ks, n) in enumerate(spans):
        last = int(torch.nonzero(mask[b]).max())
        for l in range(L):
            r = att[l][b, :, last, ks: ks + n].float()
            if name == "tiny-splice-vila":
                r = r[:, column_to_row(n)]
            rows[b, l, :, :n] = r
    return rows, out.logits


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def real_positions(name, model, inputs):
    _, mask = expected_spans(name, model, inputs)
    return mask


# ----------------------------------------------------------------------------- knockout reference


def _ko_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Eager attention in float64 plus the authors' additive knockout mask."""
    spec = module.__dict__["_test_ko"]
    B, H, Sq, D = query.shape
    Sk = key.shape[2]
    G = H // key.shape[1]
    q = query.double()
    k = key.double().repeat_interleave(G, dim=1)
    v = value.double().repeat_interleave(G, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        s = s + attention_mask[:, :, :, :Sk].double()
    else:  # no padding: eager builds no mask only for Sq == 1
        rows = torch.arange(Sk - Sq, Sk)
        s = s.masked_fill(torch.arange(Sk)[None, :] > rows[:, None], float("-inf"))
    # M[b, i, j] = 1 where row i (absolute position Sk - Sq + i) is a query row of the
    # knockout and key j is a dropped image token.
    M = torch.zeros(B, Sq, Sk, dtype=torch.bool)
    pos = torch.arange(Sk - Sq, Sk)
    per = B // len(spec["rows"])  # generate() with beams repeats each sample
    for b in range(B):
        ks, n, keep_row, q0, q1 = spec["rows"][b // per]
        qrow = (pos >= q0) & (pos < (Sk if spec["queries"] == "prompt+generated" else q1))
        dropped = torch.zeros(Sk, dtype=torch.bool)
        dropped[ks: ks + n] = ~keep_row
        M[b] = qrow[:, None] & dropped[None, :]
    if spec["mode"] == "renorm":
        s = s.masked_fill(M[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
    else:
        p = torch.softmax(s, dim=-1).masked_fill(M[:, None], 0.0)
    out = torch.matmul(p, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), p.to(query.dtype)


def _register_ref():
    from transformers import AttentionInterface

    AttentionInterface.register("test_ko_eager", _ko_eager)


class knockout_reference:
    """Context manager: the eager twin with the authors' knockout at ``layers``.

    ``keep (B, N_max)`` is row-major (as vg.maps); rows run from the first text token
    after the image to the last prompt token (``queries="prompt"``) or on through every
    generated token.
    """

    def __init__(self, name, ref, inputs, layers, keep, mode="renorm", queries="prompt"):
        _register_ref()
        spans, mask = expected_spans(name, ref, inputs)
        rows = []
        for b, (ks, n) in enumerate(spans):
            kr = keep[b, :n].clone()
            if name == "tiny-splice-vila":  # keep is row-major; the sequence is column-major
                seq = torch.ones(n, dtype=torch.bool)
                seq[column_to_row(n)] = kr
                kr = seq
            last = int(torch.nonzero(mask[b]).max())
            rows.append((ks, n, kr, ks + n, last + 1))
        self.spec = {"rows": rows, "mode": mode, "queries": queries}
        self.attns = [decoder_layers(name, ref)[l].self_attn for l in layers]
        self.saved = []

    def __enter__(self):
        for a in self.attns:
            cfg = copy.copy(a.config)
            cfg.__dict__["_attn_implementation_internal"] = "test_ko_eager"
            self.saved.append((a, a.config))
            a.config = cfg
            a.__dict__["_test_ko"] = self.spec
        return self

    def __exit__(self, *exc):
        for a, cfg in self.saved:
            a.config = cfg
            a.__dict__.pop("_test_ko", None)
        return False


def generate(name, model, inputs, n_new=4):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)
    if not is_splice(name):
        out = out[:, inputs["input_ids"].shape[1]:]
    return out
