# 25.7M non-embedding parameters (58.9M with the 64794 x 512 embedding): d512 / L8 / 8 heads.
# Step counts assume 8 GPUs: 32 x 2 x 8 x 512 = 262,144 tokens/step; 9,200 steps = 2.4B tokens.
# With fewer GPUs raise grad_accum to keep tokens/step (and the schedule) the same.
out_dir = "out/pretrain_25m"
data_dir = "data/processed"
dim = 512
n_layers = 8
n_heads = 8
max_seq_len = 512
batch_size = 32
grad_accum = 2
learning_rate = 1.5e-3
warmup_iters = 1000
decay_shape = "1-sqrt"
# the default four-phase mixtures of pretrain.py, with this model's budgets
phase_iters = {"general": 6000, "refined": 2000, "anneal": 800, "clinical": 400}  # decay: 13% of 9,200 steps
compile = True
eval_interval = 500
save_interval = 1000
