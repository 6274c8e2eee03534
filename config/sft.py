# SFT of a pretrained model on data/sft/sft_data.csv (sft_data_process.py), from the latest
# checkpoint of pretrain_dir. 16 x 4 rows/step per GPU, several conversations packed per row.
out_dir = "out/sft"
sft_csv = "data/sft/sft_data.csv"
pretrain_dir = "out/pretrain_100m"
pack = True
epochs = 3.0
batch_size = 16
grad_accum = 4
learning_rate = 1e-4
min_lr_ratio = 0.1
warmup_iters = 100
eval_interval = 500
save_interval = 1000
