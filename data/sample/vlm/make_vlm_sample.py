#!/usr/bin/env python3
"""Generate the vision-language sample under data/sample/vlm/: small drawn images ("scans" and shapes) with
ORIGINAL Chinese (and a few English) captions and questions, in the real file formats of LLaVA, minimind-v,
SLAKE, PMC-VQA and VQA-RAD. Nothing is copied from those datasets; the pictures are drawings, not scans.

    python data/sample/vlm/make_vlm_sample.py            # overwrites the files next to this script
    python data/sample/vlm/make_vlm_sample.py --out DIR

Needs Pillow and pyarrow. The output is the same on every run (fixed seeds, sorted tables).
"""

import argparse
import csv
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
SEED = "mini-chinese-gpt-vlm-sample-v1"
SIDE = {"left": "左", "right": "右"}
SIDE_EN = {"left": "Left", "right": "Right"}


# ---------------------------------------------------------------- drawings


def chest_xray(finding, rng):
    """A frontal chest film: dark background, thorax, two dark lung fields, the spine; `finding` puts an opacity in
    the patient's left or right lung (shown on the image's right or left, as radiographs are read)."""
    image = Image.new("L", (SIZE, SIZE), 12)
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 4, 58, 62), fill=150)
    draw.ellipse((12, 10, 29, 52), fill=45 + rng.randint(0, 10))
    draw.ellipse((35, 10, 52, 52), fill=45 + rng.randint(0, 10))
    draw.rectangle((30, 6, 34, 60), fill=220)
    if finding != "none":
        x = 40 if finding == "left" else 18
        y = rng.randint(22, 34)
        draw.ellipse((x, y, x + 8, y + 7), fill=200)
    return image


def head_ct(finding, rng):
    """An axial head CT: bright skull ring, grey brain, and for a finding a bright spot (a bleed) on one side."""
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 5, 56, 59), fill=235)
    draw.ellipse((12, 9, 52, 55), fill=105 + rng.randint(0, 8))
    draw.line((32, 12, 32, 52), fill=80)
    if finding != "none":
        x = 40 if finding == "left" else 17
        draw.ellipse((x, 24, x + 7, 32), fill=210)
    return image


def abdomen_mri(finding, rng):
    """An axial abdominal MRI: body outline, liver (image left), spleen, two kidneys; a finding: a dark liver lesion."""
    image = Image.new("L", (SIZE, SIZE), 5)
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 12, 60, 56), fill=90)
    draw.ellipse((9, 18, 33, 40), fill=170)
    draw.ellipse((42, 20, 54, 32), fill=150)
    draw.ellipse((18, 40, 26, 50), fill=200)
    draw.ellipse((38, 40, 46, 50), fill=200)
    if finding != "none":
        draw.ellipse((16 + rng.randint(0, 4), 24, 23 + rng.randint(0, 4), 31), fill=40)
    return image.convert("RGB")


COLOURS = {
    "红色": (220, 40, 40),
    "蓝色": (40, 70, 220),
    "绿色": (40, 170, 70),
    "黄色": (235, 200, 30),
    "紫色": (140, 60, 180),
}


def shapes(items):
    """Coloured shapes on white: items [(colour, shape, (x, y))]."""
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for colour, shape, (x, y) in items:
        box = (x, y, x + 20, y + 20)
        fill = COLOURS[colour]
        if shape == "圆形":
            draw.ellipse(box, fill=fill)
        elif shape == "正方形":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x + 10, y), (x, y + 20), (x + 20, y + 20)], fill=fill)
    return image


def encoded(image, kind):
    buffer = io.BytesIO()
    image.save(buffer, kind, **({"quality": 85} if kind == "JPEG" else {"optimize": True}))
    return buffer.getvalue()


# ---------------------------------------------------------------- the cases

CHEST = [("none", 1), ("left", 2), ("right", 3), ("none", 4), ("left", 5), ("right", 6), ("none", 7), ("left", 8)]
HEAD = [("none", 11), ("right", 12), ("left", 13), ("none", 14)]
ABDOMEN = [("none", 21), ("lesion", 22), ("none", 23)]
SHAPE_SETS = [
    [("红色", "圆形", (8, 8))],
    [("蓝色", "正方形", (36, 36))],
    [("绿色", "三角形", (22, 22))],
    [("黄色", "圆形", (36, 8)), ("紫色", "正方形", (8, 36))],
    [("红色", "三角形", (8, 36)), ("蓝色", "圆形", (36, 8))],
    [("绿色", "正方形", (8, 8)), ("黄色", "三角形", (36, 36))],
    [("紫色", "圆形", (22, 22))],
    [("蓝色", "三角形", (8, 8)), ("红色", "正方形", (36, 36))],
]
POSITION = {(8, 8): "左上角", (36, 36): "右下角", (22, 22): "中央", (36, 8): "右上角", (8, 36): "左下角"}


def chest_caption(finding):
    if finding == "none":
        return "这是一张正位胸部X线片，两侧肺野清晰，未见明显阴影，心影大小正常。"
    return f"这是一张正位胸部X线片，{SIDE[finding]}肺中野可见一处类圆形高密度阴影，其余肺野清晰。"


def head_caption(finding):
    if finding == "none":
        return "这是一张头部CT横断面图像，颅骨完整，脑实质密度均匀，中线结构居中。"
    return f"这是一张头部CT横断面图像，{SIDE[finding]}侧大脑半球可见一处高密度影，提示可能有出血。"


def abdomen_caption(finding):
    if finding == "none":
        return "这是一张腹部磁共振横断面图像，可见肝脏、脾脏和两侧肾脏，形态未见异常。"
    return "这是一张腹部磁共振横断面图像，肝脏内可见一处低信号结节，其余脏器未见异常。"


def shapes_caption(items):
    parts = [f"{POSITION[xy]}有一个{colour}的{shape}" for colour, shape, xy in items]
    return "白色背景上，" + "，".join(parts) + "。"


def build(out):
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    chest = {n: (f, chest_xray(f, random.Random(f"{SEED}:chest:{n}"))) for f, n in CHEST}
    head = {n: (f, head_ct(f, random.Random(f"{SEED}:head:{n}"))) for f, n in HEAD}
    abdomen = {n: (f, abdomen_mri(f, random.Random(f"{SEED}:abdomen:{n}"))) for f, n in ABDOMEN}
    shape_images = {i: (items, shapes(items)) for i, items in enumerate(SHAPE_SETS)}

    # LLaVA: images/ + a LLaVA-Pretrain-style caption file and a mix665k-style instruction file (JSON arrays)
    llava = out / "llava"
    (llava / "images").mkdir(parents=True, exist_ok=True)
    pretrain, instruct = [], []
    caption_prompts = ["请简要描述这张图片。", "用一句话概括图片的内容。", "这张图片里有什么？"]
    for i, (items, image) in shape_images.items():
        name = f"images/shape_{i:02d}.png"
        (llava / name).write_bytes(encoded(image, "PNG"))
        prompt = caption_prompts[i % 3]
        pretrain.append(
            {
                "id": f"shape_{i:02d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"{prompt}\n<image>" if i % 2 else f"<image>\n{prompt}"},
                    {"from": "gpt", "value": shapes_caption(items)},
                ],
            }
        )
        colour, shape, xy = items[0]
        instruct.append(
            {
                "id": f"shape_qa_{i:02d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n图中{POSITION[xy]}是什么形状？"},
                    {"from": "gpt", "value": f"是一个{shape}。"},
                    {"from": "human", "value": "它是什么颜色的？"},
                    {"from": "gpt", "value": f"{colour}。"},
                ],
            }
        )
    for n, (finding, image) in sorted(chest.items())[:4]:
        name = f"images/chest_{n:02d}.png"
        (llava / name).write_bytes(encoded(image, "PNG"))
        pretrain.append(
            {
                "id": f"chest_{n:02d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\n描述这张医学影像。"},
                    {"from": "gpt", "value": chest_caption(finding)},
                ],
            }
        )
        answer = (
            "未见明显异常，两侧肺野清晰。"
            if finding == "none"
            else f"{SIDE[finding]}肺中野有一处高密度阴影，建议结合临床进一步检查。"
        )
        instruct.append(
            {
                "id": f"chest_qa_{n:02d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "这张胸片有什么异常吗？<image>"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    instruct.append(
        {
            "id": "text_only_00",
            "conversations": [
                {"from": "human", "value": "拍胸片之前需要做什么准备？"},
                {"from": "gpt", "value": "一般取下项链、带金属的内衣等物品，按技师的要求站好并屏住呼吸即可。"},
            ],
        }
    )
    write_json(llava / "blip_laion_cc_sbu_sample.json", pretrain)
    write_json(llava / "llava_v1_5_mix665k_sample.json", instruct)

    # minimind-v: Parquet (conversations as a JSON string, image_bytes) and the older JSON lines with an image folder
    minimind = out / "minimind_v"
    rows = []
    for n, (finding, image) in sorted(head.items()):
        rows.append(
            {
                "conversations": json.dumps(
                    [
                        {"role": "user", "content": "<image>\n请提供对图片的详细文字描述。"},
                        {"role": "assistant", "content": head_caption(finding)},
                    ],
                    ensure_ascii=False,
                ),
                "image_bytes": encoded(image, "PNG"),
            }
        )
    for n, (finding, image) in sorted(abdomen.items()):
        rows.append(
            {
                "conversations": json.dumps(
                    [
                        {"role": "user", "content": "这是哪个部位的什么检查？<image>"},
                        {"role": "assistant", "content": abdomen_caption(finding)},
                    ],
                    ensure_ascii=False,
                ),
                "image_bytes": encoded(image, "PNG"),
            }
        )
    rows.append(
        {
            "conversations": json.dumps(
                [  # a text-only row: a small black image fills the column, unused
                    {"role": "user", "content": "磁共振检查前为什么要去掉金属物品？"},
                    {"role": "assistant", "content": "磁共振有很强的磁场，金属物品可能被吸动或发热，也会干扰成像。"},
                ],
                ensure_ascii=False,
            ),
            "image_bytes": encoded(Image.new("RGB", (8, 8)), "PNG"),
        }
    )
    write_parquet(minimind / "pretrain_i2t.parquet", rows)
    (minimind / "sft_images").mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (finding, image) in sorted(chest.items())[4:]:
        (minimind / "sft_images" / f"{n}.png").write_bytes(encoded(image, "PNG"))
    pairs = [(5, 6), (7, 8)]
    for a, b in pairs:
        fa, fb = chest[a][0], chest[b][0]
        answer = "；".join(
            f"第{k}张：" + ("未见异常" if f == "none" else f"{SIDE[f]}肺有阴影") for k, f in ((1, fa), (2, fb))
        )
        lines.append(
            {
                "conversations": [
                    {"role": "user", "content": "第一张片子：<image>\n第二张片子：<image>\n分别说说两张胸片的发现。"},
                    {"role": "assistant", "content": answer + "。"},
                ],
                "image": f"{a}.png, {b}.png",
            }
        )
    for n in (6, 7):
        finding = chest[n][0]
        answer = "正常，两侧肺野清晰。" if finding == "none" else f"不正常，{SIDE[finding]}肺可见阴影。"
        lines.append(
            {
                "conversations": [
                    {"role": "user", "content": "<image>\n这张胸片正常吗？"},
                    {"role": "assistant", "content": answer},
                ],
                "image": f"{n}.png",
            }
        )
    write_jsonl(minimind / "sft_vlm_data.jsonl", lines)

    # SLAKE: imgs/xmlabN/source.jpg, train.json and test.json (JSON arrays, English and Chinese questions)
    slake = out / "slake"
    questions, qid = {"train": [], "test": []}, 0
    cases = [(n, "chest", f, img) for n, (f, img) in sorted(chest.items())] + [
        (n, "head", f, img) for n, (f, img) in sorted(head.items())
    ]
    for k, (n, organ, finding, image) in enumerate(cases):
        folder = slake / "imgs" / f"xmlab{n}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "source.jpg").write_bytes(encoded(image.convert("RGB"), "JPEG"))
        split = "test" if k % 4 == 3 else "train"
        modality, location = ("X-Ray", "Chest") if organ == "chest" else ("CT", "Brain")
        abnormal = finding != "none"
        items = [
            ("What modality is used to take this image?", modality, "en", "OPEN", "Modality"),
            ("这张图像是用什么成像方式拍摄的？", "X线" if organ == "chest" else "CT", "zh", "OPEN", "Modality"),
            ("Is this image abnormal?", "Yes" if abnormal else "No", "en", "CLOSED", "Abnormality"),
            ("图像中是否有异常？", "是" if abnormal else "否", "zh", "CLOSED", "Abnormality"),
        ]
        if abnormal:
            where = f"{SIDE_EN[finding]} Lung" if organ == "chest" else f"{SIDE_EN[finding]} Brain"
            items.append(("异常位于哪一侧？", f"{SIDE[finding]}侧", "zh", "OPEN", "Position"))
            items.append(("Where is the abnormality?", where, "en", "OPEN", "Position"))
        for question, answer, lang, answer_type, content in items:
            questions[split].append(
                {
                    "img_id": n,
                    "img_name": f"xmlab{n}/source.jpg",
                    "question": question,
                    "answer": answer,
                    "q_lang": lang,
                    "location": location,
                    "modality": modality,
                    "answer_type": answer_type,
                    "base_type": "vqa",
                    "content_type": content,
                    "triple": ["vhead", "_", "_"],
                    "qid": qid,
                }
            )
            qid += 1
    for split, items in questions.items():
        write_json(slake / f"{split}.json", items, indent=None)

    # PMC-VQA: images/*.jpg and train.csv / test.csv with four choices written "A:text"
    pmc = out / "pmc_vqa"
    (pmc / "images").mkdir(parents=True, exist_ok=True)
    header = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    splits = {"train": [], "test": []}
    all_cases = (
        [(n, "chest", f, img) for n, (f, img) in sorted(chest.items())]
        + [(n, "head", f, img) for n, (f, img) in sorted(head.items())]
        + [(n, "abdomen", f, img) for n, (f, img) in sorted(abdomen.items())]
    )
    for k, (n, organ, finding, image) in enumerate(all_cases):
        name = f"PMC{900000 + n}_Fig{1 + k % 3}_{n}.jpg"
        (pmc / "images" / name).write_bytes(encoded(image.convert("RGB"), "JPEG"))
        truth = {"chest": "X线平片", "head": "CT", "abdomen": "磁共振"}[organ]
        choices = ["X线平片", "CT", "磁共振", "超声"]
        rng.shuffle(choices)
        letter = "ABCD"[choices.index(truth)]
        row = (
            [name, "这张图像采用的是哪种检查方法？", f" {letter}:{truth}"]
            + [f" {'ABCD'[i]}:{c}" for i, c in enumerate(choices)]
            + [letter]
        )
        splits["test" if k % 5 == 4 else "train"].append(row)
    for split, rows_ in splits.items():
        with open(pmc / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([header] + rows_)

    # VQA-RAD: `VQA_RAD Image Folder/synpicN.jpg` and `VQA_RAD Dataset Public.json`
    rad = out / "vqa_rad"
    folder = rad / "VQA_RAD Image Folder"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for n, organ, finding, image in all_cases[::2]:
        name = f"synpic{50000 + n}.jpg"
        (folder / name).write_bytes(encoded(image.convert("RGB"), "JPEG"))
        organ_name = {"chest": "CHEST", "head": "HEAD", "abdomen": "ABD"}[organ]
        abnormal = finding != "none"
        for question, answer, answer_type, question_type in [
            (
                "这张图像显示的是身体哪个部位？",
                {"chest": "胸部", "head": "头部", "abdomen": "腹部"}[organ],
                "OPEN",
                "ORGAN",
            ),
            ("图像中有病灶吗？", "有" if abnormal else "没有", "CLOSED", "PRES"),
            ("Is there an abnormality?", "yes" if abnormal else "no", "CLOSED", "ABN"),
        ]:
            records.append(
                {
                    "qid": len(records) + 1,
                    "image_name": name,
                    "image_organ": organ_name,
                    "answer": answer,
                    "answer_type": answer_type,
                    "question_type": question_type,
                    "question": question,
                    "phrase_type": "freeform",
                }
            )
    write_json(rad / "VQA_RAD Dataset Public.json", records)


def write_json(path, data, indent=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "conversations": pa.array([r["conversations"] for r in rows], pa.string()),
            "image_bytes": pa.array([r["image_bytes"] for r in rows], pa.binary()),
        }
    )
    pq.write_table(table, path, row_group_size=4)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    build(Path(parser.parse_args().out))


if __name__ == "__main__":
    main()
