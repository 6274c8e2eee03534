# SFT of the quickstart's tiny model on the sample SFT sets (CPU, about a minute).
out_dir = "out/quickstart/sft"
sft_csv = "out/quickstart/sft_data.csv"
pretrain_dir = "out/quickstart/pretrain"
batch_size = 8
grad_accum = 1
learning_rate = 1e-3
warmup_iters = 10
epochs = 3.0
val_fraction = 0.05
dropout = 0.1
eval_interval = 40
eval_windows = 16
log_interval = 5
save_interval = 0
