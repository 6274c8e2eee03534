# Stage 1 of the quickstart's VLM: the projector learns the sample's captions (a tiny random tower; CPU, seconds).
out_dir = "out/quickstart/vlm/align"
stage = "align"
init_from = "out/quickstart/sft/ckpt.pt"
vision_tower = "out/quickstart/vision_tower"  # quickstart.py writes a random 2-layer CLIP tower here
sources = [
    "llava=data/sample/vlm/llava/blip_laion_cc_sbu_sample.json",
    "minimind_v=data/sample/vlm/minimind_v/pretrain_i2t.parquet",
]
plain_prompts = True
val_fraction = 0.1
batch_size = 8
grad_accum = 1
learning_rate = 3e-3
warmup_iters = 5
max_iters = 30
eval_interval = 30
eval_windows = 16
log_interval = 5
save_interval = 0
