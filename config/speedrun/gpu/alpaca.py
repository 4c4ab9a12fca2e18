# speedrun.sh, gpu preset (NOT MEASURED), stage 3: prepare/chat.py alpaca keeps every Alpaca conversation
# (52K, less the 5% held out for val).
max_conversations = 0  # all
