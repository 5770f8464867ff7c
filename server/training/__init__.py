"""Prefix-tuning of the frozen base model (Li & Liang 2021), free of HTTP and Redis.

    data.py            examples from jsonl / E2E csv, tokenized (EOS after the completion)
    reparam.py         the MLP reparameterization, started at real-word activations
    prefix_forward.py  HF's forward with a prefix as its KV cache (training and test oracle)
    trainer.py         TrainConfig, train_prefix(): examples in, kv [L, 2, Hkv, P, hd] out
    peft_export.py     kv -> a HF PEFT PREFIX_TUNING adapter folder
    bleu.py            multi-reference BLEU (sacrebleu)
    evaluate.py        greedy generation through the serving engine, scored by BLEU
"""
