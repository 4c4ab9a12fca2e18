# Fine-tune on your own small question/answer file, with LoRA, without overfitting it.
# A file of "Q: ...\nA: ..." pairs (or JSONL of {"messages": [...]}) becomes chat token files with a validation
# split held out:
#   python prepare/chat.py my_questions.txt --name my_qa --format qa --val_fraction 0.1
#   python train.py config/finetune_qa.py --init_from=out/sft/best.pt
# LoRA rank 8 on every projection trains ~2% of the weights; the checkpoint holds only the adapters and the
# sha256 of its base. Small data: many epochs, early stopping on val loss, the best checkpoint kept.
# sample.py, chat.py and export.py load the result as they are (adapters are merged on load).
out_dir = "out/my_qa"
init_from = "out/sft/best.pt"
data = "my_qa"
num_epochs = 20.0
batch_size = 8
block_size = 256
learning_rate = 1e-3  # adapters start at zero and take a larger rate than full fine-tuning
min_lr = 1e-4
warmup_iters = 10
eval_interval = 20
eval_iters = 10
patience = 5
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "q,k,v,o,gate,up,down"
