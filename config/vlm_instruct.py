# Stage 2 (LLaVA-1.5's visual instruction tuning): projector + LLM on Chinese visual instructions and medical VQA,
# the loss on answers only; the tower stays frozen. Starts from config/vlm_align.py's checkpoint. LLaVA-1.5: 128
# rows a step, lr 2e-5 for a 7B model; a small LLM takes a larger rate.
out_dir = "out/vlm/instruct"
stage = "instruct"
init_from = "out/vlm/align/ckpt.pt"
_chinese_llava = "data/raw/Chinese-LLaVA-Vision-Instructions"
sources = [
    f"llava_instruct={_chinese_llava}/LLaVA-Instruct-150K/translated/llava_instruct_150k.json",
    "minimind_v=data/raw/minimind-v_dataset/sft_i2t.parquet",
    "slake=data/raw/Slake1.0/train.json",
    "pmc_vqa=data/raw/PMC-VQA/train_2.csv",
    "vqa_rad=data/raw/VQA_RAD/VQA_RAD Dataset Public.json",
]
image_folders = {"llava_instruct": "data/raw/coco/train2017"}
plain_prompts = False
epochs = 1.0
batch_size = 16  # x 8 GPUs = 128 rows a step
grad_accum = 1
learning_rate = 1e-4
warmup_iters = 100
decay_shape = "cosine"
eval_interval = 500
save_interval = 1000
