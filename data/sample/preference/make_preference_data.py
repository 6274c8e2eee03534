#!/usr/bin/env python3
"""Generate the sample preference (DPO) data under data/sample/preference/.

Three folders, one per record format corpora.py reads (all text original, built from make_sample_data.py's
disease tables and the answer templates below; nothing copied from a real dataset):

    medical_reward/train.json          JSON lines {question, response_chosen, response_rejected}, like
                                       shibing624/medical's reward split; some lines also carry MedicalGPT's
                                       dpo_zh fields {system, history}
    dpo_pairs/train.jsonl              TRL's layout {prompt, chosen, rejected}: text, and a few conversational
                                       records (prompt as [{role, content}], answers as one assistant message)
    dpo_conversations/train.jsonl      MedicalGPT's multi-turn layout {conversations [{from, value}], chosen
                                       {from: gpt, value}, rejected {...}}: earlier turns, then the question

The chosen answer is the factual one of the sample's templates; the rejected one is unhelpful, unsafe (skips
the doctor, misuses drugs) or about another disease, so a model can learn the preference. Deterministic:

    python3 data/sample/preference/make_preference_data.py
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from make_sample_data import DISEASES, FIELDS, answer, question, rng_for

UNHELPFUL = [
    "这个不好说，你自己上网查一下吧。",
    "每个人情况不一样，我也说不清楚。",
    "没什么大不了的，别想太多。",
    "这个问题我回答不了。",
    "多喝热水，注意休息就行。",
]
UNSAFE = [
    "不用去医院，自己去药店买点抗生素吃几天就好了。",
    "这个病不用管它，过段时间自然就好了，不必检查。",
    "把别人剩下的药拿来吃就行，省得挂号。",
    "症状轻的话把药量加倍，好得更快。",
    "偏方比医院的药管用，药就别吃了。",
]
SYSTEMS = ["你是一名耐心、严谨的全科医生，回答要准确并提醒患者必要时就医。", "你是医疗健康助手。"]


def rejected_answer(field, d, rng):
    """An answer worse than the factual one: unhelpful, unsafe, or about another disease."""
    kind = rng.random()
    if kind < 0.35:
        return rng.choice(UNHELPFUL)
    if kind < 0.7:
        return rng.choice(UNSAFE)
    other = rng.choice([x for x in DISEASES if x["name"] != d["name"]])
    return answer(field, other, rng).replace(other["name"], d["name"])


def pairs(name, count):
    """(disease, question, chosen, rejected) tuples from one seeded generator."""
    rng = rng_for(name)
    out = []
    for i in range(count):
        d = DISEASES[rng.randrange(len(DISEASES))]
        field = rng.choice(FIELDS)
        out.append((d, question(field, d, rng), answer(field, d, rng), rejected_answer(field, d, rng)))
    return out


def medical_reward(count=120):
    rng = rng_for("preference-reward-extras")
    records = []
    for d, q, chosen, rejected in pairs("preference-reward", count):
        record = {"question": q, "response_chosen": chosen, "response_rejected": rejected}
        if rng.random() < 0.25:  # MedicalGPT's dpo_zh variant: system and history fields, usually empty
            field = rng.choice(FIELDS)
            history = [[question(field, d, rng), answer(field, d, rng)]] if rng.random() < 0.5 else []
            record = {"system": rng.choice(SYSTEMS + [""]), "history": history, **record}
        records.append(record)
    return records


def dpo_pairs(count=60):
    rng = rng_for("preference-trl-extras")
    records = []
    for d, q, chosen, rejected in pairs("preference-trl", count):
        if rng.random() < 0.2:  # TRL's conversational form
            records.append(
                {
                    "prompt": [{"role": "user", "content": q}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            records.append({"prompt": q, "chosen": chosen, "rejected": rejected})
    return records


def dpo_conversations(count=60):
    rng = rng_for("preference-conversations-extras")
    records = []
    for d, q, chosen, rejected in pairs("preference-conversations", count):
        turns = []
        if rng.random() < 0.3:
            turns.append({"from": "system", "value": rng.choice(SYSTEMS)})
        for _ in range(rng.randint(0, 2)):
            field = rng.choice(FIELDS)
            turns += [
                {"from": "human", "value": question(field, d, rng)},
                {"from": "gpt", "value": answer(field, d, rng)},
            ]
        turns.append({"from": "human", "value": q})
        records.append(
            {
                "conversations": turns,
                "chosen": {"from": "gpt", "value": chosen},
                "rejected": {"from": "gpt", "value": rejected},
            }
        )
    return records


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    out = ap.parse_args().out
    write_jsonl(os.path.join(out, "medical_reward", "train.json"), medical_reward())
    write_jsonl(os.path.join(out, "dpo_pairs", "train.jsonl"), dpo_pairs())
    write_jsonl(os.path.join(out, "dpo_conversations", "train.jsonl"), dpo_conversations())
    print(f"wrote 3 files under {out}")


if __name__ == "__main__":
    main()
