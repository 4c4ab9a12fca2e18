# speedrun.sh, cpu preset, stage 3: prepare/chat.py alpaca keeps the first 1,000 Alpaca train conversations
# (all of the ../shared/data copy, which holds 1,000 records less the 5% held out for val; downloading, the
# first 1,000 of 52K): with identity and arithmetic, 450 SFT steps see each about once or twice.
max_conversations = 1000
