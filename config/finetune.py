# The conservative fine-tune: a pretrained model continues on your own text (or conversations) at a low
# learning rate, so that it takes on the new data without forgetting what it knew.
#   python prepare/text.py my_text.txt --name my_text --doc_sep blank    # with the model's tokenizer
#   python train.py config/finetune.py --init_from=out/tinystories/best.pt --data=my_text
# Always --init_from=PATH: a fresh optimizer and schedule from the checkpoint's weights (--init_from=resume
# continues a run's own schedule, optimizer and best val loss: it is for runs that were interrupted).
# At every evaluation: ckpt_<step>.pt (keep whichever reads best), a greedy sample of each of
# sample_prompts (printed and in log.jsonl), best.pt and best.safetensors at the lowest val loss.
out_dir = "out/finetune"
init_from = "out/tinystories/best.pt"
data = "my_text"
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 20
max_iters = 500
eval_interval = 50
eval_iters = 20
keep_all_checkpoints = True
save_safetensors = True
sample_prompts = "Once upon a time|The king said"
sample_max_new_tokens = 48
