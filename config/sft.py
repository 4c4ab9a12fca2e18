# Supervised fine-tuning of a pretrained (or midtrained) model on conversations: the loss counts only the
# assistant's tokens. Prepare the conversations first, e.g. Alpaca-cleaned:
#   python prepare/chat.py alpaca_cleaned --source prepare/sample/alpaca_cleaned
#   python train.py config/sft.py --init_from=out/tinystories/best.pt
# A new, lower learning-rate schedule over a few epochs; best.pt keeps the lowest val loss, patience stops early
# and train.py warns when val loss rises while train loss falls (overfitting).
out_dir = "out/sft"
init_from = "out/tinystories/best.pt"
data = "alpaca_cleaned"
num_epochs = 3.0  # sets max_iters from the number of conversations
batch_size = 16
block_size = 256  # conversations longer than this are cut (the log counts them)
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 20
eval_interval = 50
eval_iters = 20
patience = 5
dropout = 0.1  # small data overfits quickly
