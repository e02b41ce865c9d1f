"""VGRefine (batched, padded, KV-cache reuse) against the authors' three-pass recipe.

The naive implementation below is written independently of vgkernels.refine: one sample
at a time, the *eager* model with ``output_attentions=True`` for the question prompt and
for the full reference prompt, ``numpy.percentile`` triage, and the authors' dense
additive mask (``finfo.min`` on question-row × dropped-image-key entries) added to the
attention mask of the knockout layers during the prefill of ``generate``.
"""
import numpy as np
import pytest
import torch

from vgkernels.constants import REFERENCE_PROMPT as REF
from vgkernels.refine import VGRefine
from tiny_models import models
from vgkernels.integrations.tiny import IMAGE_TOKEN_INDEX
from vgkernels.integrations.tiny import test_image as make_image

FAMILIES = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-splice", "tiny-splice-vila"]
HEADS = [(2, 1), (1, 0), (3, 3), (1, 2), (2, 0)]
G = 4


def chat(proc, text):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def encode_one(proc, image, text):
    if hasattr(proc, "tokenizer_image_token"):
        return dict(proc(images=[image], text=[text]))
    return dict(proc(images=[image], text=[text], return_tensors="pt"))


def image_span(model, inputs, n_text_cols):
    """(start, N) of the image in the LLM's columns for one unpadded sample."""
    ids = inputs["input_ids"][0]
    hit = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten()
    if hit.numel():
        return int(hit[0]), n_text_cols - (ids.numel() - 1)
    tid = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    cols = torch.nonzero(ids == tid).flatten()
    return int(cols[0]), int(cols.numel())


def decoder_layers(model):
    if hasattr(model, "llm"):
        return model.llm.model.layers
    inner = model.model
    return getattr(inner, "language_model", inner).layers


def last_row_maps(model, inputs):
    out = model(**inputs, output_attentions=True)
    att = [a[0, :, -1].double() for a in out.attentions]  # L x (H, S)
    return torch.stack(att), out


def naive_refine(eager, proc, image, question, *, layers, k, p, keep=None):
    """Three full passes, batch 1. Returns (tokens, per-step logits, keep, question maps
    (L, H, N) and head-mean reference maps (L, N) over the image)."""
    q_in = encode_one(proc, image, chat(proc, question))
    with torch.no_grad():
        qmaps, qout = last_row_maps(eager, q_in)
        S = qmaps.shape[-1]
        start, N = image_span(eager, q_in, S)
        ref = None
        if keep is None:
            r_in = encode_one(proc, image, chat(proc, REF))
            rmaps, _ = last_row_maps(eager, r_in)
            rstart, rN = image_span(eager, r_in, rmaps.shape[-1])
            assert (rstart, rN) == (start, N)
            ref = rmaps[:, :, rstart:rstart + N].mean(dim=1)  # (L, N)
            agg = torch.stack([qmaps[l, h, start:start + N] / ref[l] for l, h in HEADS[:k]]).mean(0).numpy()
            keep = torch.from_numpy(agg >= np.percentile(agg, p))
        keep = keep.bool()

        q0 = start + N  # first text token after the image

        def add_knock(mod, args, kwargs):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            if hs.shape[1] != S:  # decode steps keep their attention
                return None
            m = kwargs.get("attention_mask")
            neg = torch.finfo(hs.dtype).min
            if m is None:
                m = torch.triu(torch.full((S, S), neg, dtype=hs.dtype), 1)[None, None]
            knock = torch.zeros(1, 1, S, S, dtype=hs.dtype)
            cols = torch.arange(start, start + N)[~keep]
            knock[:, :, q0:, cols] = neg
            kwargs["attention_mask"] = m + knock
            return args, kwargs

        hooks = [decoder_layers(eager)[l].self_attn.register_forward_pre_hook(add_knock, with_kwargs=True)
                 for l in layers]
        try:
            gen = eager.generate(**q_in, max_new_tokens=G, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        finally:
            for h in hooks:
                h.remove()
    seqs = gen.sequences[0]
    new = seqs[-len(gen.logits):]
    return new, [l[0].float() for l in gen.logits], keep, qmaps[:, :, start:start + N], ref


def column_major_to_row_major(seq_vals):
    """VILA's downsampler emits token i at (y, x) = (i % g, i // g); VGRefine reports
    keep masks row-major (t = y * g + x)."""
    n = seq_vals.numel()
    g = int(round(n ** 0.5))
    i = torch.arange(n)
    out = torch.empty_like(seq_vals)
    out[(i % g) * g + i // g] = seq_vals
    return out


def compare_tokens(ours, ours_logits, ref_tokens, ref_logits, tol):
    """Greedy tokens equal step by step until a step where the reference's top-2 gap is
    within numerical noise (then the tie may break either way and later steps differ)."""
    n = 0
    for g, (a, b) in enumerate(zip(ours.tolist(), ref_tokens.tolist())):
        torch.testing.assert_close(ours_logits[g], ref_logits[g], atol=tol, rtol=tol)
        top2 = torch.topk(ref_logits[g], 2).values
        if float(top2[0] - top2[1]) < 10 * tol:
            break
        assert a == b, f"step {g}: ours {a} != naive {b}"
        n += 1
    return n


def sample_batch(gen, name):
    seeds = torch.randint(0, 10_000, (3,), generator=gen).tolist()
    if "qwen" in name or "next" in name:
        sizes = [(64, 48), (40, 84), (56, 56)]  # different token counts N per sample
    else:
        sizes = [(64, 48), (40, 60), (50, 50)]
    images = [make_image(w, h, seed=s) for (w, h), s in zip(sizes, seeds)]
    questions = ["Is there a cat?", "What organ is shown here? Answer with one word.",
                 "Is the lesion on the left side of the image or on the right side?"]
    return images, questions


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("reuse", [True, False], ids=["skip-lower", "all-layers"])
def test_refine_matches_naive_three_pass(name, reuse, gen):
    fast, fproc, eager = models(name)
    eproc = fproc
    layers, k, p = ([2] if reuse else [1, 3]), 5, 50.0
    vr = VGRefine(fast, fproc, heads=HEADS, layers=layers, top_k=k, percentile=p, max_new_tokens=G,
                  reuse_lower_layers=reuse)
    images, questions = sample_batch(gen, name)
    res = vr(images, questions, baseline=True, return_maps=True)
    checked = 0
    for b in range(len(images)):
        tok, logits, keep, qmaps, ref = naive_refine(eager, eproc, images[b], questions[b], layers=layers, k=k, p=p)
        N = int(res.keep[b].numel())
        for i, l in enumerate(res.map_layers):
            want_q, want_r = qmaps[l], ref[l]
            if name == "tiny-splice-vila":
                want_q = torch.stack([column_major_to_row_major(m) for m in want_q])
                want_r = column_major_to_row_major(want_r)
            torch.testing.assert_close(res.maps[b, i, :, :N].double(), want_q, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(res.reference[b, i, :N].double(), want_r, atol=1e-5, rtol=1e-4)
            assert torch.isnan(res.maps[b, i, :, N:]).all(), "maps are NaN past each sample's N"
        if name == "tiny-splice-vila":
            keep = column_major_to_row_major(keep)
        assert torch.equal(res.keep[b], keep), f"sample {b}: keep mask differs"
        ours_logits = [sl[b] for sl in res.step_logits]
        checked += compare_tokens(res.tokens[b], ours_logits, tok, logits, tol=2e-4)
        # the baseline is plain greedy decoding of the same prompt
        base = eager.generate(**encode_one(eproc, images[b], chat(eproc, questions[b])), max_new_tokens=1,
                              do_sample=False, output_logits=True, return_dict_in_generate=True)
        torch.testing.assert_close(res.baseline_logits[b], base.logits[0][0].float(), atol=2e-4, rtol=2e-4)
    assert checked >= len(images), "too few greedy steps were decidable to compare"


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-splice"])
def test_knockout_changes_answer_logits(name, gen):
    """The knockout is not a no-op: logits move when tokens are dropped, and a keep mask
    of all True gives back plain inference."""
    fast, fproc, _ = models(name)
    vr = VGRefine(fast, fproc, heads=HEADS, layers=[1], max_new_tokens=1)
    images, questions = sample_batch(gen, name)
    prep = vr.prepare(images, questions)
    st = vr.default
    keep = vr.keep_mask(prep, st)
    knocked, _ = vr.knockout_logits(prep, keep, st)
    all_true = torch.ones_like(keep)
    plain, _ = vr.knockout_logits(prep, all_true, st)
    torch.testing.assert_close(plain, prep.first_logits, atol=2e-5, rtol=2e-5)
    assert (knocked - plain).abs().max() > 1e-3


def test_right_and_left_padded_splice_agree(gen):
    """The LLaVA codebase pads after the splice on either side; answers must not depend on it."""
    images, questions = sample_batch(gen, "tiny-splice")
    outs = []
    for side in ("right", "left"):
        fast, fproc, _ = models("tiny-splice", tokenizer_padding_side=side)
        vr = VGRefine(fast, fproc, heads=HEADS, layers=[2], max_new_tokens=G)
        outs.append(vr(images, questions))
    torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=2e-4, rtol=2e-4)
    for a, b in zip(outs[0].keep, outs[1].keep):
        assert torch.equal(a, b)


def test_zero_mode_matches_eager_probability_masking(gen, monkeypatch):
    """mode="zero" is the paper's α̂ = α ⊙ M: softmax over every key, then the dropped image
    probabilities of the question rows set to 0 without renormalising."""
    import transformers.models.llama.modeling_llama as ML

    fast, fproc, eager = models("tiny-llava")
    eproc = fproc
    layers = [1, 2]
    vr = VGRefine(fast, fproc, heads=HEADS, layers=layers, mode="zero", max_new_tokens=G)
    images, questions = sample_batch(gen, "tiny-llava")
    res = vr(images, questions)
    orig = ML.eager_attention_forward
    for b in range(len(images)):
        q_in = encode_one(eproc, images[b], chat(eproc, questions[b]))
        S = q_in["input_ids"].shape[1]
        start, N = image_span(eager, q_in, S)
        dropped = torch.arange(start, start + N)[~res.keep[b]]

        def zeroed(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
            if module.layer_idx not in layers or query.shape[2] != S:
                return orig(module, query, key, value, attention_mask, scaling, dropout, **kw)
            k = ML.repeat_kv(key, module.num_key_value_groups)
            v = ML.repeat_kv(value, module.num_key_value_groups)
            w = torch.matmul(query, k.transpose(2, 3)) * scaling
            if attention_mask is not None:
                w = w + attention_mask
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
            w[:, :, start + N:, dropped] = 0.0
            return torch.matmul(w, v).transpose(1, 2).contiguous(), w

        monkeypatch.setattr(ML, "eager_attention_forward", zeroed)
        with torch.no_grad():
            out = eager.generate(**q_in, max_new_tokens=G, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        monkeypatch.setattr(ML, "eager_attention_forward", orig)
        new = out.sequences[0][-len(out.logits):]
        compare_tokens(res.tokens[b], [sl[b] for sl in res.step_logits], new, [l[0].float() for l in out.logits],
                       tol=2e-4)
    renorm = VGRefine(fast, fproc, heads=HEADS, layers=layers, mode="renorm", max_new_tokens=1)(images, questions)
    assert (renorm.logits - res.logits).abs().max() > 1e-4, "zero and renorm modes must differ"
