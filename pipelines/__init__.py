"""Pipeline stages (corpus, tokenizer, pretrain, experts, merge, evaluate) and the runner that chains them."""
