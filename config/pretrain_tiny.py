# A model small enough to train on the sample data on a 2-core CPU in a few minutes (quickstart, tests).
out_dir = "out/quickstart/pretrain"
data_dir = "out/quickstart/data"
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2  # exercises grouped-query attention
max_seq_len = 256
dropout = 0.1  # the sample is small: a little regularisation helps the held-out text
batch_size = 8
grad_accum = 1
learning_rate = 2e-3
warmup_iters = 20
decay_shape = "1-sqrt"
phases = [
    {"name": "general", "iters": 120, "mixture": {"wiki": 1, "baike": 1, "c4_zh": 1, "wudao": 1, "skypile": 1}},
    {"name": "refined", "iters": 80, "mixture": {"wiki": 1, "baike": 1, "medical_pretrain": 0.5}},
    {
        "name": "anneal",
        "iters": 40,
        "decay": True,
        "mixture": {
            "wiki": 1,
            "baike": 1,
            "medical_pretrain": 2,
            "cmedqa2": 1,
            "chatmed_tcm": 0.5,
            "medical_dialogue": 1,
        },
    },
    {
        "name": "clinical",
        "iters": 20,
        "decay": True,
        "mixture": {"guidelines": 1, "medical_pretrain": 1, "cmekg": 0.5, "text": 0.5, "wiki": 0.5},
    },
]
eval_interval = 40
eval_windows = 16
log_interval = 5
save_interval = 0
