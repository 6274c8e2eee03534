"""The vision-language model: preprocessing, tower loading, image readers, splicing and labels, the two
training stages (frozen parts, DDP, resume), generation, chat, VQA scoring and the LLaVA export."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import chat
import corpora
import eval as evaluate
import export_hf
import inference
import vision
import vlm_train
from dataset_vlm import VLMData
from lm_head import IGNORE_INDEX
from model import ModelArgs, Transformer
from parallel import Dist
from trainer import Trainer, default_config
from vlm import VLM, build_vlm, images_kept, set_trainable

from conftest import ROOT, SAMPLE, save, wander

VLM_SAMPLE = SAMPLE / "vlm"
TOKENS = 16  # the random tower: 32 px images, 8 px patches, CLS dropped


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    return vision.save_random_tower(tmp_path_factory.mktemp("tower") / "clip", "clip")


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tiny_tokenizer.vocab_size, max_seq_len=128)
    )
    path = tmp_path_factory.mktemp("text") / "sft.pt"
    save(model, path, tiny_tokenizer, step=1, phase="sft")
    return path


def tiny_vlm(tok, tower_dir, text_ckpt, **kw):
    torch.manual_seed(0)
    return build_vlm(text_ckpt, tower_dir, tok, **kw).eval()


def drawn(size=(40, 52), colour=(200, 60, 60), seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse((4, 4, size[0] - 6, size[1] - 8), fill=colour)
    return image


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- preprocessing and the tower


@pytest.mark.parametrize(
    "config",
    [
        # openai/clip-vit-base-patch16's file: the older integer sizes
        {
            "feature_extractor_type": "CLIPFeatureExtractor",
            "size": 224,
            "crop_size": 224,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "image_mean": vision.CLIP_MEAN,
            "image_std": vision.CLIP_STD,
            "resample": 3,
        },
        {
            "image_processor_type": "SiglipImageProcessor",
            "size": {"height": 224, "width": 224},
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
            "resample": 3,
            "rescale_factor": 1 / 255,
        },
        # a crop larger than the resize: zero padding around the centre
        {"image_processor_type": "ChineseCLIPImageProcessor", "size": {"shortest_edge": 31}, "crop_size": 36},
    ],
)
def test_preprocessing_matches_transformers(tmp_path, config):
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = vision.read_preprocess(tmp_path)
    theirs = AutoImageProcessor.from_pretrained(tmp_path)
    assert theirs.backend == "pil"
    # 299x197: the long edge becomes 339.98 -> 339 (truncated); RGBA composited on white; palette; grey
    images = [
        drawn((299, 197)),
        drawn((197, 299)).convert("RGBA"),
        drawn((64, 40)).convert("P"),
        drawn((50, 50)).convert("L"),
    ]
    for image in images:
        expected = theirs(image, return_tensors="np")["pixel_values"][0]
        got = vision.preprocess_image(image, ours)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


def test_tower_loads_from_an_image_text_checkpoint(tmp_path):
    """What users download (openai/clip-vit-base-patch16) is the whole CLIP model: the tower is read out of it."""
    from transformers import CLIPConfig, CLIPModel

    vision_cfg = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text_cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=99,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg)).eval()
    full.save_pretrained(tmp_path)
    vision.save_random_tower(tmp_path / "other")  # for its preprocessor_config.json
    (tmp_path / "preprocessor_config.json").write_bytes((tmp_path / "other" / "preprocessor_config.json").read_bytes())
    tower, preprocess = vision.load_tower(tmp_path)
    assert type(tower).__name__ == "CLIPVisionModel" and preprocess["crop"] == [32, 32]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(pixels, output_hidden_states=True).hidden_states[-2], expected)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(ValueError, match="not a vision tower"):
        vision.load_tower(tmp_path)
    with pytest.raises(FileNotFoundError, match="no vision tower"):
        vision.load_tower(tmp_path / "missing")


# ---------------------------------------------------------------------------- readers


def read(spec, folder=None):
    problems = corpora.Problems()
    return list(corpora.iter_image_dialogues(corpora.parse_source(spec), problems, folder)), problems


def test_readers_on_the_sample(tmp_path):
    items, problems = read(f"llava={VLM_SAMPLE / 'llava' / 'llava_v1_5_mix665k_sample.json'}")
    assert len(items) == 13 and not problems.total
    assert items[0].turns == [("<image>\n图中左上角是什么形状？", "是一个圆形。"), ("它是什么颜色的？", "红色。")]
    assert items[0].images == [VLM_SAMPLE / "llava" / "images" / "shape_00.png"]
    moved = [i for i in items if i.turns[0][0].startswith("<image>\n这张胸片")]
    assert moved and moved[0].turns[0][0] == "<image>\n这张胸片有什么异常吗？"  # LLaVA moves <image> to the start
    assert items[-1].images == [] and "<image>" not in items[-1].turns[0][0]  # a text-only conversation

    items, problems = read(f"minimind_v={VLM_SAMPLE / 'minimind_v' / 'pretrain_i2t.parquet'}")
    assert len(items) == 8 and not problems.total
    assert items[0].images[0].startswith(b"\x89PNG") and items[4].turns[0][0] == "这是哪个部位的什么检查？<image>"
    assert items[-1].images == []  # the text-only row's placeholder image is not used
    minimind = VLM_SAMPLE / "minimind_v"
    items, _ = read(f"minimind_v={minimind / 'sft_vlm_data.jsonl'}", minimind / "sft_images")
    assert [len(i.images) for i in items] == [2, 2, 1, 1] and items[0].images[1].name == "6.png"

    items, problems = read(f"slake={VLM_SAMPLE / 'slake' / 'train.json'}")
    assert len(items) == 48 and not problems.total
    assert items[0].turns == [("<image>\nWhat modality is used to take this image?", "X-Ray")]
    assert items[0].answer_type == "open" and items[2].answer_type == "closed"
    assert items[0].images == [VLM_SAMPLE / "slake" / "imgs" / "xmlab1" / "source.jpg"]

    items, problems = read(f"pmc_vqa={VLM_SAMPLE / 'pmc_vqa' / 'test.csv'}")
    assert len(items) == 3 and not problems.total
    assert items[0].turns == [
        ("<image>\n这张图像采用的是哪种检查方法？\nA. 磁共振\nB. X线平片\nC. CT\nD. 超声", "B. X线平片")
    ]
    assert items[0].options == {"A": "磁共振", "B": "X线平片", "C": "CT", "D": "超声"} and items[0].label == "B"

    items, problems = read(f"vqa_rad={VLM_SAMPLE / 'vqa_rad'}")  # the folder: images are skipped quietly
    assert len(items) == 24 and not problems.total
    counting = tmp_path / "VQA_RAD Dataset Public.json"  # an answer that is a count is a number in the real file
    (tmp_path / "VQA_RAD Image Folder").mkdir()
    drawn().save(tmp_path / "VQA_RAD Image Folder" / "a.jpg")
    record = {"qid": 1, "image_name": "a.jpg", "question": "How many gallstones?", "answer": 4, "answer_type": "OPEN"}
    counting.write_text(json.dumps([record, {**record, "answer": True}]), encoding="utf-8")
    counted, problems = read(f"vqa_rad={counting}")
    assert [item.turns[0][1] for item in counted] == ["4"] and problems.counts == {"field 'answer' is not text": 1}
    llava_med = tmp_path / "llava_med.json"  # LLaVA-Med's files spell the field "conversatons"
    conversation = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cyst."}]
    llava_med.write_text(json.dumps([{"id": "1", "image": "a.jpg", "conversatons": conversation}]), encoding="utf-8")
    assert len(read(f"llava={llava_med}", tmp_path / "VQA_RAD Image Folder")[0]) == 1
    assert items[1].turns == [("<image>\n图像中有病灶吗？", "没有")] and items[4].turns[0][1] == "有"
    assert items[1].answer_type == "closed" and items[0].images[0].parent.name == "VQA_RAD Image Folder"


def test_bad_records_are_counted_not_fatal(tmp_path):
    drawn().save(tmp_path / "a.png")

    def record(image, question, answer="x"):
        return {
            "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        }

    records = [
        record("a.png", "看图<image>", "好"),
        record("missing.png", "<image>"),
        record("../a.png", "<image>"),
        record(str(tmp_path / "a.png"), "<image>"),
        record("a.png", "<image><image>"),
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records, ensure_ascii=False))
    items, problems = read(f"llava={tmp_path / 'llava.json'}")
    assert [i.turns[0] for i in items] == [("<image>\n看图", "好"), ("你好", "你好！")]
    assert problems.counts == {
        "missing image file": 1,
        "image path outside the image folder": 2,
        "<image> placeholders do not match the images": 1,
    }
    assert any(e.startswith(f"{tmp_path / 'llava.json'}:#1: missing image file") for e in problems.examples)

    # PMC-VQA's older column spelling, a label inferred from the answer text, a label that is no choice
    rows = (
        "Figure_path,Question,Anwser,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
        "a.png,哪种检查？, B:CT, A:超声, B:CT, C:MRI, D:X线,\n"
        "a.png,哪种检查？, B:CT, A:超声, B:CT, C:MRI, D:X线,E\n"
    )
    (tmp_path / "images").mkdir()
    drawn().save(tmp_path / "images" / "a.png")
    (tmp_path / "pmc.csv").write_text(rows, encoding="utf-8")
    items, problems = read(f"pmc_vqa={tmp_path / 'pmc.csv'}")
    assert [(i.label, i.turns[0][1]) for i in items] == [("B", "B. CT")]
    assert problems.counts == {"the answer is none of the choices (by Answer_label, letter or text)": 1}
    # the *_2.csv layout: no Answer_label, Answer is the gold letter (here against a choice whose text is "C")
    rows = (
        "index,Figure_path,Caption,Question,Choice A,Choice B,Choice C,Choice D,Answer,split\n"
        "0,a.png,cap,哪个字母？,A:D,B:C,C:A,D:B,A,test\n"
        "1,a.png,cap,哪种检查？,A:超声,B:CT,C:MRI,D:X线,E,test\n"
    )
    (tmp_path / "test_2.csv").write_text(rows, encoding="utf-8")
    items, problems = read(f"pmc_vqa={tmp_path / 'test_2.csv'}")
    assert [(i.label, i.turns[0][1]) for i in items] == [("A", "A. D")]
    assert problems.counts == {"the answer is none of the choices (by Answer_label, letter or text)": 1}

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    items, problems = read(f"minimind_v={tmp_path / 'broken.parquet'}")
    assert items == [] and list(problems.counts) == ["unreadable Parquet data, rest of file skipped"]


def test_values_that_are_not_text_never_become_text(tmp_path):
    """Image-text readers take only strings as questions, answers and image names: a number, a list, an
    object or a boolean makes the record a counted bad one, never "5" or "None" as text. The one exception:
    an answer that is an integer, a count (VQA-RAD's "How many?")."""
    (tmp_path / "imgs").mkdir()
    drawn().save(tmp_path / "imgs" / "a.png")
    good = {
        "qid": 1,
        "img_name": "a.png",
        "question": "有异常吗？",
        "answer": "没有",
        "q_lang": "zh",
        "answer_type": "CLOSED",
    }
    not_text = [5, 3.5, True, ["文本"], {"text": "文本"}]
    records = [good] + [{**good, field: value} for field in ("question", "answer", "img_name") for value in not_text]
    (tmp_path / "slake.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    items, problems = read(f"slake={tmp_path / 'slake.json'}")
    assert [i.turns[0][1] for i in items] == ["没有", "5"]
    assert problems.total == 3 * len(not_text) - 1
    items = items[:1]
    # image paths relative to the data folder: tmp_path itself may hold a "5" (pytest-15)
    strings = [text for i in items for turn in i.turns for text in turn]
    strings += [str(Path(p).relative_to(tmp_path)) for i in items for p in i.images]
    assert not any(leaked in s for s in strings for leaked in ("5", "True", "[", "{"))


def test_a_vqa_question_holding_placeholders_is_skipped_not_misaligned(tmp_path):
    (tmp_path / "imgs").mkdir()
    drawn().save(tmp_path / "imgs" / "a.png")
    good = {"qid": 1, "img_name": "a.png", "question": "有异常吗？", "answer": "没有", "answer_type": "CLOSED"}
    records = [good, {**good, "question": "<image><image>这两张呢？"}, {**good, "answer": "见<image>"}]
    (tmp_path / "slake.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    items, problems = read(f"slake={tmp_path / 'slake.json'}")
    assert [i.turns[0][0] for i in items] == ["<image>\n有异常吗？"]
    assert problems.counts == {"<image> placeholders do not match the images": 2}


# ---------------------------------------------------------------------------- splicing and labels


def test_image_tokens_and_labels(tmp_path, tiny_tokenizer):
    tok, image_id = tiny_tokenizer, tiny_tokenizer.special_ids["[MASK]"]
    drawn(seed=1).save(tmp_path / "a.png")
    drawn(seed=2).save(tmp_path / "b.png")
    records = [
        {
            "conversations": [
                {"role": "user", "content": "甲<image>乙<image>丙"},
                {"role": "assistant", "content": "答"},
            ],
            "image": "a.png, b.png",
        }
    ]
    (tmp_path / "mm.jsonl").write_text(json.dumps(records, ensure_ascii=False) + "\n")
    preprocess = vision.read_preprocess(vision.save_random_tower(tmp_path / "tower"))
    source = corpora.parse_source(f"minimind_v={tmp_path / 'mm.jsonl'}")
    data = VLMData([source], tok, 64, 3, image_id, preprocess, val_fraction=0)
    X, Y, extras = data.to_batch([[0]])
    a, b, c, answer = tok.encode_batch(["甲", "乙", "丙", "答"])
    ids = a + [image_id] * 3 + b + [image_id] * 3 + c + [tok.bos_id] + answer + [tok.eos_id]
    n = len(ids) - 1
    assert X[0, :n].tolist() == ids[:-1] and (X[0, n:] == tok.pad_id).all()
    prompt = len(a + b + c) + 6
    assert Y[0, :n].tolist() == [IGNORE_INDEX] * prompt + answer + [tok.eos_id] and (Y[0, n:] == IGNORE_INDEX).all()
    expected = torch.from_numpy(
        np.stack([vision.preprocess_image(Image.open(tmp_path / name), preprocess) for name in ("a.png", "b.png")])
    )
    torch.testing.assert_close(extras["images"], expected, rtol=0, atol=0)  # in the order of the placeholders

    plain = VLMData([source], tok, 64, 3, image_id, preprocess, val_fraction=0, plain_prompts=True)
    X, Y, _ = plain.to_batch([[0]])  # the align stage: the images alone, then the answer
    assert X[0, : 7 + len(answer)].tolist() == [image_id] * 6 + [tok.bos_id] + answer
    assert Y[0, : 8 + len(answer)].tolist() == [IGNORE_INDEX] * 6 + answer + [tok.eos_id, IGNORE_INDEX]

    # a context that can hold the answer but only by cutting into the first image drops the conversation
    short = len(b + c) + 3 + 1 + len(answer) + 1 + 1
    with pytest.raises(ValueError, match="an image cut by max_seq_len"):
        VLMData([source], tok, short, 3, image_id, preprocess, val_fraction=0)
    assert images_kept([image_id] * 6 + [5], image_id, 3) == 2 and images_kept([image_id] * 5, image_id, 3) is None


def test_model_puts_image_features_at_the_placeholders(tiny_tokenizer, tower_dir, text_ckpt):
    model = tiny_vlm(tiny_tokenizer, tower_dir, text_ckpt)
    image_id = model.args.image_token_id
    assert model.args.image_tokens == TOKENS
    x = torch.tensor([[5, 6] + [image_id] * TOKENS + [7, 8], [9] + [image_id] * TOKENS + [10, 11, 12]])
    pixels = vision.pixel_batch([drawn(seed=1), drawn(seed=2)], model.args.preprocess)
    with torch.no_grad():
        got = model(x, images=pixels)
        # by hand: the tower's second-to-last layer without CLS, the projector, in place of the token embeddings
        features = model.projector(model.vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
        h = F.embedding(x, model.llm.tok_embeddings.weight).clone()
        h[x == image_id] = features.flatten(0, 1)
        cos, sin = model.llm.rope_cos[: x.shape[1]], model.llm.rope_sin[: x.shape[1]]
        for layer in model.llm.layers:
            h = layer(h, cos, sin)
        expected = F.linear(model.llm.norm(h), model.llm.tok_embeddings.weight)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="2 image"):
        model(x[:, :-1], images=pixels[:1])
    with pytest.raises(ValueError, match="32 image positions"):
        model(x)


def test_pooling_averages_2x2_patches(tiny_tokenizer, tower_dir, text_ckpt):
    model = tiny_vlm(tiny_tokenizer, tower_dir, text_ckpt, projector_pool=2)
    assert model.args.image_tokens == 4
    features = torch.randn(1, 16, model.args.vision["hidden_size"])
    grid = features.view(1, 4, 4, -1)
    pooled = torch.stack([grid[0, i : i + 2, j : j + 2].mean((0, 1)) for i in (0, 2) for j in (0, 2)])[None]
    p = model.projector
    torch.testing.assert_close(p(features), p.linear_2(p.act(p.linear_1(pooled))))
    with pytest.raises(ValueError, match="must divide"):
        tiny_vlm(tiny_tokenizer, tower_dir, text_ckpt, projector_pool=3)


def test_generation_with_images_cache_and_batch(tiny_tokenizer, tower_dir, text_ckpt):
    model = tiny_vlm(tiny_tokenizer, tower_dir, text_ckpt)
    wander(model.llm, std=0.3)
    images = [drawn(seed=3)]
    kw = dict(max_new_tokens=16, temperature=0)
    cached = inference.answer_ids(model, tiny_tokenizer, ["图里有什么？"], images=images, **kw)
    plain = inference.answer_ids(model, tiny_tokenizer, ["图里有什么？"], images=images, use_cache=False, **kw)
    assert cached == plain and len(set(cached[0])) > 3
    prompts = ["图里有什么？", "颜色"]
    together = inference.answer_ids(model, tiny_tokenizer, prompts, images=images, **kw)
    alone = [inference.answer_ids(model, tiny_tokenizer, [p], images=images, **kw)[0] for p in prompts]
    assert together == alone
    other = inference.answer_ids(
        model, tiny_tokenizer, ["图里有什么？"], images=[drawn((40, 52), (0, 0, 255), seed=9)], **kw
    )
    assert other != cached  # the image is seen


# ---------------------------------------------------------------------------- training


def data_for(tok, model, sources, plain=True):
    specs = [corpora.parse_source(s) for s in sources]
    a = model.args
    return VLMData(
        specs,
        tok,
        a.max_seq_len,
        a.image_tokens,
        a.image_token_id,
        a.preprocess,
        val_fraction=0,
        plain_prompts=plain,
        image_folders={"minimind_v": VLM_SAMPLE / "minimind_v" / "sft_images"},
    )


CFG = default_config(dtype="float32", learning_rate=1e-2, batch_size=4, grad_accum=1, eval_windows=4)


@pytest.mark.parametrize("stage, trained", [("align", {"projector"}), ("instruct", {"projector", "llm"})])
def test_frozen_parts_get_no_gradient_and_no_optimizer_state(tiny_tokenizer, tower_dir, text_ckpt, stage, trained):
    model = tiny_vlm(tiny_tokenizer, tower_dir, text_ckpt)
    set_trainable(model, stage)
    trainer = Trainer(model, CFG, Dist("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = data_for(
        tiny_tokenizer,
        model,
        [
            f"llava={VLM_SAMPLE / 'llava' / 'blip_laion_cc_sbu_sample.json'}",
            f"minimind_v={VLM_SAMPLE / 'minimind_v' / 'pretrain_i2t.parquet'}",
        ],
    )
    trainer.train_step(data.train_batches(0, 1, 4), 1e-2)
    for part in ("vision", "llm", "projector"):
        changed = [not torch.equal(v, before[f"{part}.{k}"]) for k, v in getattr(model, part).state_dict().items()]
        assert any(changed) == (part in trained), part
        assert all(p.grad is None for p in getattr(model, part).parameters())  # zero_grad(set_to_none) or never
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    state = {id(p) for p in trainer.optimizer.state}
    for part in ("vision", "llm", "projector"):
        ids = {id(p) for p in getattr(model, part).parameters()}
        assert (ids <= in_optimizer and ids <= state) if part in trained else not (ids & (in_optimizer | state)), part


def train_args(tmp_path, tok_dir, tower_dir, init_from, *extra):
    return [
        "config/vlm_align_tiny.py",
        f"--out_dir={tmp_path}",
        f"--init_from={init_from}",
        f"--vision_tower={tower_dir}",
        f"--tokenizer={tok_dir}",
        "--dtype=float32",
        "--progress=False",
        "--tensorboard=False",
        "--log_interval=1",
        "--eval_interval=3",
        "--max_iters=6",
        "--batch_size=4",
        "--val_fraction=0.2",
        "--dropout=0.1",
        *extra,
    ]


def losses(out):
    records = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.mark.parametrize("lora", [[], ["--lora_rank=4"]])
def test_resume_is_bit_identical(tmp_path, tiny_tokenizer_dir, tower_dir, text_ckpt, lora):
    """instruct: 6 steps == 3 steps (stop_at) + resume + 3 steps, float for float (dropout on: RNG restored);
    with LoRA too, whose checkpoints hold the projector and the adapters, and whose merged.pt chats."""
    vlm_train.main(train_args(tmp_path / "align", tiny_tokenizer_dir, tower_dir, text_ckpt, "--max_iters=2"))
    instruct = [
        "config/vlm_instruct_tiny.py",
        f"--init_from={tmp_path / 'align' / 'ckpt.pt'}",
        f"--tokenizer={tiny_tokenizer_dir}",
        "--dtype=float32",
        "--progress=False",
        "--tensorboard=False",
        "--log_interval=1",
        "--eval_interval=3",
        "--batch_size=4",
        "--dropout=0.1",
        "--max_iters=6",
        *lora,
    ]
    vlm_train.main(instruct + [f"--out_dir={tmp_path / 'full'}"])
    vlm_train.main(instruct + [f"--out_dir={tmp_path / 'part'}", "--stop_at=3"])
    ckpt = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["phase"] == "instruct"
    vlm_train.main(instruct + [f"--out_dir={tmp_path / 'part'}", "--init_from=resume"])
    full = losses(tmp_path / "full")
    assert [s for s, _ in full] == list(range(1, 7)) and losses(tmp_path / "part") == full
    if lora:
        keys = set(torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["model"])
        assert keys and all(k.startswith("projector.") or ".lora_" in k for k in keys)
        assert any(k.startswith("projector.") for k in keys) and any(".lora_" in k for k in keys)
        model, _, ckpt, _ = inference.load(tmp_path / "full" / "merged.pt", tiny_tokenizer_dir)
        assert isinstance(model, VLM) and ckpt["step"] == 6


def test_ddp_two_processes_match_one(tmp_path, tiny_tokenizer_dir, tower_dir, text_ckpt):
    """align on 2 gloo ranks x batch 2 == 1 process x batch 4 (the same global rows and token-mean loss)."""
    runs = {}
    for name, nproc, batch in (("one", 1, 4), ("ddp", 2, 2)):
        launcher = (
            [sys.executable]
            if nproc == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        )
        args = train_args(
            tmp_path / name, tiny_tokenizer_dir, tower_dir, text_ckpt, f"--batch_size={batch}", "--dropout=0.0"
        )
        result = subprocess.run(
            launcher + ["vlm_train.py"] + args,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        runs[name] = losses(tmp_path / name)
    assert [s for s, _ in runs["ddp"]] == [s for s, _ in runs["one"]] == list(range(1, 7))
    np.testing.assert_allclose([loss for _, loss in runs["ddp"]], [loss for _, loss in runs["one"]], rtol=1e-5)


def test_undecodable_image_is_counted_and_its_row_left_out(tmp_path, tiny_tokenizer, tower_dir, text_ckpt):
    model = tiny_vlm(tiny_tokenizer, tower_dir, text_ckpt)
    drawn(seed=1).save(tmp_path / "good.png")
    (tmp_path / "cut.png").write_bytes(png(drawn(seed=2))[:200])  # a truncated download
    records = [
        {
            "image": name,
            "conversations": [{"from": "human", "value": "<image>\n描述"}, {"from": "gpt", "value": "一个圆"}],
        }
        for name in ("good.png", "cut.png", "good.png")
    ]
    (tmp_path / "data.json").write_text(json.dumps(records, ensure_ascii=False))
    data = data_for(tiny_tokenizer, model, [f"llava={tmp_path / 'data.json'}"])
    for _ in range(2):
        X, Y, extras = data.to_batch([[0], [1], [2]])
    assert (Y[1] == IGNORE_INDEX).all() and (Y[0] != IGNORE_INDEX).any() and torch.equal(Y[0], Y[2])
    assert extras["images"].shape[0] == 3 and (extras["images"][1] == 0).all()
    assert data.problems.counts == {"image cannot be decoded: its rows are left out of the loss": 1}  # counted once
    assert any("data.json:#1" in e and "cut.png" in e for e in data.problems.examples)
    with torch.no_grad():
        model(X, Y, images=extras["images"])  # the batch still runs

    items, _ = read(f"llava={tmp_path / 'data.json'}")
    r = evaluate.evaluate_vqa(items, evaluate.vqa_predictor(model, tiny_tokenizer, 4, 8))
    assert r["overall"]["n"] == 2 and r["skipped"] == 1 and "cut.png" in r["skipped_examples"][0]


# ---------------------------------------------------------------------------- use: chat, VQA scoring, export


@pytest.fixture(scope="module")
def vlm_ckpt(tmp_path_factory, tiny_tokenizer, tower_dir, text_ckpt):
    model = tiny_vlm(tiny_tokenizer, tower_dir, text_ckpt)
    wander(model, std=0.3)  # greedy answers wander, and the image moves them
    return save(model, tmp_path_factory.mktemp("vlm") / "ckpt.pt", tiny_tokenizer, phase="instruct")


def test_serve_refuses_a_vision_language_checkpoint_in_one_line(vlm_ckpt, tiny_tokenizer_dir):
    import serve

    with pytest.raises(SystemExit, match="is a vision-language checkpoint; serve.py serves text checkpoints"):
        serve.main(["--ckpt", str(vlm_ckpt), "--tokenizer", str(tiny_tokenizer_dir)])


def test_chat_with_images(vlm_ckpt, text_ckpt, tiny_tokenizer_dir, capsys):
    image = str(VLM_SAMPLE / "slake" / "imgs" / "xmlab2" / "source.jpg")
    model, tok, _, mode = inference.load(vlm_ckpt, tiny_tokenizer_dir)
    kw = dict(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    with_image = inference.answer(model, tok, ["异常在哪？"], images=[image], **kw)[0]
    assert mode == "chat" and with_image != inference.answer(model, tok, ["异常在哪？"], **kw)[0]
    chat.main(
        [
            "--ckpt",
            str(vlm_ckpt),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--image",
            image,
            "--prompt",
            "异常在哪？",
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--repetition-penalty",
            "1",
        ]
    )
    assert f"用户> 异常在哪？\n助手> {with_image}\n" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="images need a vision-language checkpoint"):
        chat.main(["--ckpt", str(text_ckpt), "--tokenizer", str(tiny_tokenizer_dir), "--image", image, "--prompt", "x"])


def test_vqa_scoring():
    closed = corpora.ImageDialogue([("<image>\n有异常吗？", "Yes")], [], "closed")
    assert evaluate.judge(closed, " yes. ") == (False, True) and evaluate.judge(closed, "No") == (False, False)
    options = corpora.ImageDialogue([("<image>\nq", "B. CT")], [], "closed", {"A": "超声", "B": "CT"}, "B")
    for prediction, right in [
        ("B", True),
        ("B. CT", True),
        ("b：CT", True),
        ("ct", True),
        ("A. 超声", False),
        ("Because", False),
        ("", False),
    ]:
        assert evaluate.judge(options, prediction) == (right, right), prediction
    english = corpora.ImageDialogue(
        [("<image>\nq", "B. A cyst")], [], "closed", {"A": "Benign tumor", "B": "A cyst"}, "B"
    )
    for prediction, right in [
        ("A cyst", True),
        ("a cyst.", True),
        ("B A cyst", True),
        ("A", False),
        ("A. Benign tumor", False),
    ]:
        assert evaluate.judge(english, prediction) == (right, right), prediction
    opened = corpora.ImageDialogue([("<image>\n哪一侧？", "左肺")], [], "open", origin=("f.json", "#3"))
    table = {"有异常吗": "yes", "q": "B", "哪一侧": "左肺。"}
    r = evaluate.evaluate_vqa(
        [closed, options, opened],
        lambda items: [next(v for k, v in table.items() if k in i.turns[-1][0]) for i in items],
    )
    assert r["closed"] == {"n": 2, "normalised": 1.0} and r["open"] == {"n": 1, "exact": 0.0, "normalised": 1.0}
    assert r["overall"]["n"] == 3 and r["items"][2]["where"] == "f.json:#3"


@pytest.mark.parametrize("model_type", ["clip", "siglip"])
def test_llava_export_round_trip(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, text_ckpt, model_type):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tower = vision.save_random_tower(tmp_path / model_type, model_type)
    model = tiny_vlm(tiny_tokenizer, tower, text_ckpt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)
        for p in model.projector.parameters():
            p.normal_(0, 0.5)
    ckpt = save(model, tmp_path / "ckpt.pt", tiny_tokenizer, step=1, phase="instruct")
    export_hf.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--tokenizer", str(tiny_tokenizer_dir)])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == ("default" if model_type == "clip" else "full")
    assert config["image_token_index"] == tiny_tokenizer.special_ids["[MASK]"] and config["image_seq_length"] == TOKENS
    diff, same_ids, pixel_diff = export_hf.check_llava(tmp_path / "hf", model, tiny_tokenizer)
    assert same_ids and pixel_diff == 0 and diff < 1e-4

    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    image = drawn(seed=5)
    inputs = processor(images=image, text="<image>\n这是什么？", return_tensors="pt")
    ids = torch.cat([inputs.input_ids, torch.tensor([[tiny_tokenizer.bos_id]])], 1)
    theirs = hf.generate(
        input_ids=ids,
        pixel_values=inputs.pixel_values,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        repetition_penalty=1.0,
    )[0, ids.shape[1] :].tolist()
    pixels = vision.pixel_batch([image], model.args.preprocess)
    ours = model.generate([ids[0].tolist()], 8, images=pixels, temperature=0)[0]
    assert len(ours) == 8 and theirs == ours


def test_export_refuses_a_pooled_model(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, tower_dir, text_ckpt):
    model = tiny_vlm(tiny_tokenizer, tower_dir, text_ckpt, projector_pool=2)
    ckpt = save(model, tmp_path / "c.pt", tiny_tokenizer, step=1)
    with pytest.raises(SystemExit, match="no pooling"):
        export_hf.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--tokenizer", str(tiny_tokenizer_dir)])
    assert not (tmp_path / "hf").exists()
