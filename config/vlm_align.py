# Stage 1 (LLaVA-1.5's "pretraining"): the projector learns to caption; the LLM (config/sft.py's output) and the
# CLIP tower stay frozen. Chinese captions: LinkSoul's translation of LLaVA's CC3M-595K set and minimind-v's
# pretrain_i2t.parquet (README "Vision-language model" lists the downloads). LLaVA-1.5: 256 rows a step, lr 1e-3.
out_dir = "out/vlm/align"
stage = "align"
init_from = "out/sft/ckpt.pt"
vision_tower = "data/models/clip-vit-base-patch16"
sources = [
    "llava_pretrain=data/raw/Chinese-LLaVA-Vision-Instructions/LLaVA-CC3M-Pretrain-595K/chat-translated.json",
    "minimind_v=data/raw/minimind-v_dataset/pretrain_i2t.parquet",
]
image_folders = {"llava_pretrain": "data/raw/LLaVA-CC3M-Pretrain-595K/images"}
plain_prompts = True  # LLaVA's "plain" template: the caption is predicted from the image alone
projector_pool = 1  # 2: 49 instead of 196 tokens an image (a 512-token LLM), but no LLaVA export
epochs = 1.0
batch_size = 32  # x 8 GPUs = 256 rows a step
grad_accum = 1
learning_rate = 1e-3
warmup_iters = 70  # ~3% of the steps, as LLaVA
decay_shape = "cosine"
eval_interval = 500
save_interval = 1000
