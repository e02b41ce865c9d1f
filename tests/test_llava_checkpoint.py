"""LLaVA-codebase checkpoints (HuatuoGPT-Vision, LLaVA-1.5, LLaVA-Med) load without the
original package.

The tests write tiny checkpoints in the real layouts — ``config.json`` with the code
base's ``mm_*`` fields, weights under the code base's names (single and sharded
safetensors, ``pytorch_model.bin``), a CLIP model saved with ``save_pretrained`` in its
own folder with the original ``preprocessor_config.json`` format, tokenizer files — and
hold the loaded model to an assembly written here from transformers' own classes: CLIP
hidden states at the select layer, the projector applied by hand, the embeddings spliced
by hand at the ``-200`` sentinel, the transformers LM on the result. The CLI then runs
``sweep``, ``heads`` and ``refine`` on such a directory, in both profiles.
"""
import json
import re
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vgkernels.cli import main
from vgkernels.integrations.tiny import byte_tokenizer
from vgkernels.integrations.tiny import test_image as make_image

SIDE, PATCH = 56, 14  # a 4x4 grid of image tokens
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
TEMPLATES = {  # one user turn with one image, as each model's code builds it
    "llava_qwen2": "<|user|>\n<image>\n{q}\n<|assistant|>\n",
    "llava_llama": ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions. USER: <image>\n{q} ASSISTANT:"),
    "llava_mistral": "[INST] <image>\n{q} [/INST]",
}
LM = {"llava_qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "llava_llama": ("LlamaConfig", "LlamaForCausalLM"),
      "llava_mistral": ("MistralConfig", "MistralForCausalLM")}


def write_tower(root, seed=0):
    """A full CLIP model (text and vision, as openai/clip-vit-large-patch14-336 ships) and
    its preprocessor_config.json in the original CLIPFeatureExtractor format."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=99),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, image_size=SIDE, patch_size=PATCH),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(root)
    with open(os.path.join(root, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": SIDE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": MEAN, "image_std": STD,
                   "resample": 3, "size": SIDE}, f)
    return root


def write_checkpoint(root, model_type="llava_qwen2", *, projector="mlp2x_gelu", select_layer=-2,
                     select_feature="patch", tower=None, weights="safetensors", save_tower=False, bos=False,
                     aspect="pad", seed=0):
    """A checkpoint directory in the code base's layout; returns (root, lm, projector weights)."""
    import transformers
    from safetensors.torch import save_file
    from tokenizers import processors

    os.makedirs(root, exist_ok=True)
    tok = byte_tokenizer(["<pad>", "<s>", "</s>"], pad="<pad>", eos="</s>", bos="<s>")
    if bos:  # Llama / Mistral tokenizers put BOS in front of every call
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))])
    tok.save_pretrained(root)
    cfg_cls, lm_cls = (getattr(transformers, n) for n in LM[model_type])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>")}
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    lm = lm_cls(cfg).eval()
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if "rotary" not in k}
    g = torch.Generator().manual_seed(seed + 7)
    proj = {"0.weight": torch.randn(64, 32, generator=g) * 0.2, "0.bias": torch.randn(64, generator=g) * 0.1}
    if projector == "mlp2x_gelu":
        proj.update({"2.weight": torch.randn(64, 64, generator=g) * 0.2, "2.bias": torch.randn(64, generator=g) * 0.1})
    else:  # linear: a bare nn.Linear
        proj = {k[2:]: v for k, v in proj.items()}
    state.update({f"model.mm_projector.{k}": v for k, v in proj.items()})
    if save_tower:  # some checkpoints carry (fine-tuned) vision weights under the code base's names
        from transformers import CLIPVisionModel

        torch.manual_seed(seed + 11)
        own = CLIPVisionModel.from_pretrained(tower).state_dict()
        tuned = {k: v + 0.05 * torch.randn_like(v) for k, v in own.items()}
        state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in tuned.items()})
    c = cfg.to_dict()
    c.update(model_type=model_type, architectures=["Llava" + model_type[6:].capitalize() + "ForCausalLM"],
             mm_hidden_size=32, mm_projector_type=projector, mm_vision_select_layer=select_layer,
             mm_vision_select_feature=select_feature, image_aspect_ratio=aspect, mm_use_im_start_end=False,
             mm_use_im_patch_token=False, mm_patch_merge_type="flat", tokenizer_padding_side="right",
             use_mm_proj=True, mm_vision_tower=tower)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    if weights == "safetensors":
        save_file(state, os.path.join(root, "model.safetensors"), metadata={"format": "pt"})
    elif weights == "sharded":
        keys = sorted(state)
        half = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, ks in half.items():
            save_file({k: state[k] for k in ks}, os.path.join(root, name), metadata={"format": "pt"})
        with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: n for n, ks in half.items() for k in ks}}, f)
    else:
        torch.save(state, os.path.join(root, "pytorch_model.bin"))
    return root, lm, proj, (tuned if save_tower else None)


# ----------------------------------------------------------------------------- the independent assembly


def expected_pixels(tower_dir, image):
    """expand2square with the mean colour, then the tower's own CLIP image processor."""
    import transformers

    w, h = image.size
    s = max(w, h)
    canvas = Image.new("RGB", (s, s), tuple(int(c * 255) for c in MEAN))
    canvas.paste(image, ((s - w) // 2, (s - h) // 2))
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return torch.as_tensor(cls.from_pretrained(tower_dir)(canvas, return_tensors="pt")["pixel_values"][0])


def expected_logits(lm, tower_dir, proj, pixels, ids, *, select_layer=-2, select_feature="patch", tuned=None):
    """CLIP hidden state -> projector by hand -> splice by hand -> the transformers LM."""
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(tower_dir).eval()
    if tuned is not None:
        clip.load_state_dict(tuned)
    with torch.no_grad():
        hs = clip(pixels[None], output_hidden_states=True).hidden_states[select_layer][0]
        feats = hs[1:] if select_feature == "patch" else hs
        x = F.linear(feats, proj["0.weight"] if "0.weight" in proj else proj["weight"],
                     proj["0.bias"] if "0.bias" in proj else proj["bias"])
        if "2.weight" in proj:
            x = F.linear(F.gelu(x), proj["2.weight"], proj["2.bias"])
        k = ids.index(-200)
        emb = lm.get_input_embeddings()
        seq = torch.cat([emb(torch.tensor(ids[:k])), x, emb(torch.tensor(ids[k + 1:]))])
        return lm(inputs_embeds=seq[None]).logits[0], x.shape[0]


def manual_ids(tok_dir, model_type, question):
    """Token ids of the chat text, tokenised piece by piece around <image>, one BOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    pre, post = TEMPLATES[model_type].format(q=question).split("<image>")
    a, b = tok(pre).input_ids, tok(post).input_ids
    if tok.bos_token_id is not None and b and b[0] == tok.bos_token_id:
        b = b[1:]
    return a + [-200] + b


def run_loaded(model, proc, images, questions, model_type):
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
    assert texts == [TEMPLATES[model_type].format(q=q) for q in questions]
    batch = proc(images=images, text=texts, padding_side="right")
    with torch.no_grad():
        return batch, model(**batch).logits


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return write_tower(str(tmp_path_factory.mktemp("clip")))


@pytest.mark.parametrize("model_type, kw", [
    ("llava_qwen2", dict(weights="sharded")),
    ("llava_llama", dict(weights="bin", bos=True, select_layer=-1)),
    ("llava_mistral", dict(projector="linear", bos=True, save_tower=True)),
])
def test_logits_equal_manual_assembly(tmp_path, tower, model_type, kw):
    from vgkernels.integrations.splice import load_llava_checkpoint

    root, lm, proj, tuned = write_checkpoint(str(tmp_path / model_type), model_type, tower=tower, **kw)
    model, proc = load_llava_checkpoint(root, torch_dtype=torch.float32)
    assert model.config.model_type == model_type and type(model).__name__.startswith("Llava")
    images = [make_image(80, 48, seed=1), make_image(40, 72, seed=2)]
    questions = ["Is there a lesion?", "Which organ is shown in this scan?"]
    batch, logits = run_loaded(model, proc, images, questions, model_type)
    for b, (im, q) in enumerate(zip(images, questions)):
        px = expected_pixels(tower, im)
        torch.testing.assert_close(batch["images"][b], px)
        ids = manual_ids(root, model_type, q)
        n_real = int(batch["attention_mask"][b].sum())
        assert batch["input_ids"][b, :n_real].tolist() == ids
        want, N = expected_logits(lm, tower, proj, px, ids, select_layer=kw.get("select_layer", -2), tuned=tuned)
        assert N == 16
        got = logits[b, : want.shape[0]]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_cls_patch_keeps_the_cls_token_and_layout_marks_it(tmp_path, tower):
    import vgkernels
    from vgkernels.integrations.splice import load_llava_checkpoint

    root, lm, proj, _ = write_checkpoint(str(tmp_path / "c"), select_feature="cls_patch", tower=tower)
    model, proc = load_llava_checkpoint(root)
    im, q = make_image(60, 60, seed=3), "Where?"
    batch, logits = run_loaded(model, proc, [im], [q], "llava_qwen2")
    ids = manual_ids(root, "llava_qwen2", q)
    want, N = expected_logits(lm, tower, proj, expected_pixels(tower, im), ids, select_feature="cls_patch")
    assert N == 17
    torch.testing.assert_close(logits[0], want, atol=2e-5, rtol=1e-5)
    with vgkernels.patch_model(model, capture=[1], processor=proc, image_sizes=[im.size], backend="torch") as vg:
        with torch.no_grad():
            model(**batch)
    lay = vg.layout[0]
    assert lay.N == 17 and lay.grid == (4, 4) and bool(torch.isnan(lay.cells[0]).all())
    assert not torch.isnan(lay.cells[1:]).any()


def test_vision_tower_resolution_and_errors(tmp_path, tower):
    import shutil

    from vgkernels.integrations.splice import load_llava_checkpoint

    # a hub id cannot be downloaded: the error says what to do
    root, *_ = write_checkpoint(str(tmp_path / "hub"), tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(ValueError, match=r"not a local directory.*--vision-tower DIR"):
        load_llava_checkpoint(root)
    model, _ = load_llava_checkpoint(root, vision_tower=tower)  # the override wins
    assert model.get_vision_tower().config.image_size == SIDE
    with pytest.raises(ValueError, match="vision_tower: '/nonexistent' is not a directory"):
        load_llava_checkpoint(root, vision_tower="/nonexistent")
    # a tower path relative to the checkpoint, as HuatuoGPT-Vision ships it
    rel, *_ = write_checkpoint(str(tmp_path / "rel"), tower="vit/clip")
    shutil.copytree(tower, os.path.join(rel, "vit", "clip"))
    load_llava_checkpoint(rel)
    for field, value, msg in [("mm_projector_type", "resampler", "mm_projector_type: expected 'linear'"),
                              ("image_aspect_ratio", "anyres", "anyres"),
                              ("mm_use_im_start_end", True, "mm_use_im_start_end"),
                              ("model_type", "llava_phi", "not a LLaVA-codebase type")]:
        with open(os.path.join(root, "config.json")) as f:
            cfg = json.load(f)
        cfg[field] = value
        with open(os.path.join(root, "config.json"), "w") as f:
            json.dump(cfg, f)
        with pytest.raises(ValueError, match=msg):
            load_llava_checkpoint(root, vision_tower=tower)
        cfg[field] = {"mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
                      "model_type": "llava_qwen2"}[field]
        with open(os.path.join(root, "config.json"), "w") as f:
            json.dump(cfg, f)


def test_generate_and_loader_entry(tmp_path, tower):
    """load_model picks the loader from the family table; generate splices once."""
    from vgkernels.integrations.loaders import load_model

    root, *_ = write_checkpoint(str(tmp_path / "g"), tower=tower)
    bundle = load_model(root, device="cpu", dtype="float32")
    assert bundle.family == "splice" and bundle.model_type == "llava_qwen2"
    text = bundle.chat("Is it round?")
    batch = bundle.processor(images=[make_image(50, 50)], text=[text])
    with torch.no_grad():
        out = bundle.model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        logits = bundle.model(**batch).logits[0, -1]  # the prompt's last row
    assert out.shape == (1, 3) and int(out[0, 0]) == int(logits.argmax())
    with pytest.raises(ValueError, match="only LLaVA-codebase checkpoints take a separate vision tower"):
        load_model(_hf_dir(tmp_path), vision_tower=tower)


def _hf_dir(tmp_path):
    """An HF LLaVA directory (to check that --vision-tower is refused for it)."""
    from vgkernels.integrations.tiny import build_tiny

    d = str(tmp_path / "hf")
    m, p = build_tiny("tiny-llava")
    m.save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- the command line


def write_data(root):
    """Sweep rows with boxes, and closed-ended + multiple-choice rows in the authors' JSON list."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    sweep_rows, qa = [], []
    for i in range(4):
        w, h = [(80, 60), (56, 56), (48, 72), (64, 64)][i]
        name = f"img/{i}.png"
        make_image(w, h, seed=i).save(os.path.join(root, name))
        sweep_rows.append({"id": f"s{i}", "image": name, "bbox": [[w // 4, h // 4, w // 2, h // 3]],
                           "question": f"Is there a bright rectangle in image {i}?", "label": ["box", "blob"][i % 2]})
        qa.append({"question": "Is there a bright rectangle?", "options": [], "answer": ["yes", "no"][i % 2],
                   "image": [name], "dataset_index": i, "dataset_name": "VQA-RAD"} if i % 2 == 0 else
                  {"question": "Where is the rectangle?", "options": ["top", "bottom", "left", "right"],
                   "answer": "top", "answer_label": "A", "image": [name], "dataset_index": i,
                   "dataset_name": "VQA-RAD"})
    qa.append(dict(qa[0], dataset_index=9, dataset_name="SLAKE"))  # left out by --where
    with open(os.path.join(root, "sweep.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in sweep_rows)
    with open(os.path.join(root, "qa.json"), "w") as f:
        json.dump(qa, f)
    return os.path.join(root, "sweep.jsonl"), os.path.join(root, "qa.json")


@pytest.mark.parametrize("profile", ["exact", "authors"])
def test_cli_sweep_heads_refine_on_a_huatuo_checkpoint(tmp_path, tower, profile, capsys):
    root, *_ = write_checkpoint(str(tmp_path / "huatuo"), tower="openai/clip-vit-large-patch14-336")
    sweep_data, qa = write_data(str(tmp_path / "data"))
    out = str(tmp_path / "sweep")
    common = ["--model", root, "--vision-tower", tower, "--profile", profile]
    assert main(["sweep", *common, "--data", sweep_data, "--out", out, "--batch-size", "2", "--no-progress",
                 "--overlays", "2"]) == 0
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["profile"] == profile and meta["family"] == "splice" and meta["L"] == 3
    recs = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    assert len(recs) == 4 and all(r["N"] == 16 for r in recs)
    csv_rows = open(os.path.join(out, "summary", "layers.csv")).read().splitlines()
    assert csv_rows[0].startswith("field,value,layer,n,ar,kl,js")
    if profile == "authors":
        assert os.path.exists(os.path.join(out, "summary", "layers_exact.csv"))
        assert all(len(r["extra"]["authors"]) == 6 for r in recs)
        # the table shows the authors' AR: the mean of the per-sample values stored beside the exact ones
        ar0 = sum(r["extra"]["authors"][0][0] for r in recs) / 4
        assert float(csv_rows[1].split(",")[4]) == pytest.approx(ar0, rel=1e-5)
        # a resume with the other profile is refused (one line, exit 1)
        capsys.readouterr()
        assert main(["sweep", "--model", root, "--vision-tower", tower, "--data", sweep_data, "--out", out,
                     "--no-progress"]) == 1
        assert "profile" in capsys.readouterr().err
    else:
        assert "extra" not in recs[0] and not os.path.exists(os.path.join(out, "summary", "layers_exact.csv"))
    assert main(["heads", "--sweep", out, "--top-k", "3"]) == 0
    heads = json.load(open(os.path.join(out, "heads.json")))["heads"]
    assert len(heads) == 3
    rout = str(tmp_path / "refine")
    assert main(["refine", *common, "--data", qa, "--heads", os.path.join(out, "heads.json"), "--layers", "1",
                 "--max-new-tokens", "3", "--batch-size", "2", "--no-progress", "--out", rout,
                 "--where", "dataset_name=VQA-RAD"]) == 0
    run = json.load(open(os.path.join(rout, "run.json")))
    assert run["profile"] == profile and run["where"] == {"dataset_name": "VQA-RAD"}
    other = "exact" if profile == "authors" else "authors"
    capsys.readouterr()  # a resume with the other profile is refused (a usage error: exit 2)
    assert main(["refine", "--model", root, "--vision-tower", tower, "--profile", other, "--data", qa, "--heads",
                 os.path.join(out, "heads.json"), "--layers", "1", "--max-new-tokens", "3", "--no-progress", "--out",
                 rout, "--where", "dataset_name=VQA-RAD"]) == 2
    assert re.search("different .*profile", capsys.readouterr().err)
    recs = [json.loads(l) for l in open(os.path.join(rout, "records.jsonl"))]
    assert [r["kind"] for r in recs] == ["short", "mc", "short", "mc"] and recs[1]["answer"] == "A"
    from vgkernels import paper
    from vgkernels.refine import eval as RE

    for r in recs:
        for res in r["results"].values():
            if profile == "authors":
                want = (paper.score_choice(res["response"], ["top", "bottom", "left", "right"]) == "A"
                        if r["kind"] == "mc" else paper.score_closed(res["response"], r["answer"]))
            else:
                row = RE.VQARow("x", "", "", r["answer"], {"A": "top", "B": "bottom", "C": "left", "D": "right"}
                                if r["kind"] == "mc" else {})
                want = RE.is_correct(row, res["response"])
            assert res["correct"] == want
    # the prompts the profile asks for reach the model
    assert RE.format_prompt("Q? ", {}, profile) == ("Q? " + " " + paper.ANSWER_LINE if profile == "authors"
                                                   else "Q?\n" + paper.ANSWER_LINE)
