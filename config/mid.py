# Midtraining: teach a pretrained base model the chat format, multiple-choice answers, calculator tool calls and
# who it is, before SFT. Each source is prepared into its own folder with the base model's tokenizer:
#   python prepare/chat.py alpaca_cleaned --source prepare/sample/alpaca_cleaned
#   python prepare/chat.py mc --source sample           # ARC-Easy/Challenge, OpenBookQA
#   python prepare/chat.py gsm8k --source sample        # with <|python_start|> tool calls
#   python prepare/chat.py identity --model_name nanollama --creator "you"
#   python train.py config/mid.py --init_from=out/tinystories/best.pt
# Weights on chat sources repeat conversations per epoch: identity:8 shows each identity conversation 8 times,
# because a handful of them would otherwise drown in thousands of others.
out_dir = "out/mid"
init_from = "out/tinystories/best.pt"
data = "alpaca_cleaned,mc,gsm8k,identity:8"
num_epochs = 1.0
batch_size = 16
block_size = 256
learning_rate = 5e-4  # about the base run's learning rate at the end of its decay x 5: a new, lower schedule
min_lr = 5e-5
warmup_iters = 50
eval_interval = 100
eval_iters = 20
patience = 5
