# speedrun.sh, cpu preset, stage 3: prepare/chat.py alpaca keeps the first 1,000 Alpaca train conversations
# (all of the sample's 1,000 records less the 5% held out for val; with --data_dir=download, the first 1,000
# of 52K): with identity and arithmetic, 450 SFT steps see each about once or twice.
max_conversations = 1000
