# DPO of the quickstart's SFT model on the sample preference pairs (CPU, about a minute).
out_dir = "out/quickstart/dpo"
init_from = "out/quickstart/sft/ckpt.pt"
sources = [
    "medical_reward=data/sample/preference/medical_reward",
    "dpo_pairs=data/sample/preference/dpo_pairs",
    "dpo_conversations=data/sample/preference/dpo_conversations",
]
batch_size = 8
grad_accum = 1
learning_rate = 2e-4
warmup_iters = 5
epochs = 2.0
val_fraction = 0.1
eval_interval = 10
eval_windows = 24
log_interval = 2
save_interval = 0
