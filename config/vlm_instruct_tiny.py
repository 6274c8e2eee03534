# Stage 2 of the quickstart's VLM: projector + LLM on the sample's visual instructions and medical VQA (CPU).
out_dir = "out/quickstart/vlm/instruct"
stage = "instruct"
init_from = "out/quickstart/vlm/align/ckpt.pt"
sources = [
    "llava=data/sample/vlm/llava/llava_v1_5_mix665k_sample.json",
    "minimind_v=data/sample/vlm/minimind_v/sft_vlm_data.jsonl",
    "slake=data/sample/vlm/slake/train.json",
    "pmc_vqa=data/sample/vlm/pmc_vqa/train.csv",
    "vqa_rad=data/sample/vlm/vqa_rad",
]
image_folders = {"minimind_v": "data/sample/vlm/minimind_v/sft_images"}
plain_prompts = False
val_fraction = 0.05
batch_size = 8
grad_accum = 1
learning_rate = 1e-3
warmup_iters = 5
max_iters = 40
eval_interval = 40
eval_windows = 16
log_interval = 5
save_interval = 0
