# speedrun.sh, ci preset, stage 3: prepare/chat.py alpaca keeps the first 200 Alpaca train conversations.
max_conversations = 200
