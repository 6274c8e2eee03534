# 108.6M non-embedding parameters (158M in all): MiniCPM's 0.1B wind-tunnel shape d768 / L16 / ff1920.
# Step counts assume 8 GPUs: 16 x 4 x 8 x 1024 = 524,288 tokens/step; 18,200 steps = 9.5B tokens.
out_dir = "out/pretrain_100m"
data_dir = "data/processed"
dim = 768
n_layers = 16
n_heads = 12
hidden_dim = 1920
max_seq_len = 1024
batch_size = 16
grad_accum = 4
learning_rate = 8e-4
warmup_iters = 2000
decay_shape = "1-sqrt"
phase_iters = {"general": 12000, "refined": 4000, "anneal": 1500, "clinical": 700}  # decay: 12% of 18,200 steps
compile = True
eval_interval = 1000
save_interval = 2000
