# 199M non-embedding parameters (266M in all): d1024 / L18 / 16 query heads sharing 4 kv heads (GQA).
# Step counts assume 8 GPUs: 16 x 4 x 8 x 1024 = 524,288 tokens/step; 36,400 steps = 19B tokens.
# For GPUs too small for the optimizer state, parallel = "fsdp" shards it (FSDP2).
out_dir = "out/pretrain_200m"
data_dir = "data/processed"
dim = 1024
n_layers = 18
n_heads = 16
n_kv_heads = 4
max_seq_len = 1024
batch_size = 16
grad_accum = 4
learning_rate = 5e-4
warmup_iters = 2000
decay_shape = "1-sqrt"
phase_iters = {"general": 24000, "refined": 8000, "anneal": 3000, "clinical": 1400}  # decay: 12% of 36,400 steps
compile = True
eval_interval = 1000
save_interval = 2000
