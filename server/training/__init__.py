"""Prefix-tuning of the frozen base model (Li & Liang 2021), free of HTTP.

    data.py            examples from jsonl / E2E csv, tokenized (EOS after the completion)
    reparam.py         the MLP reparameterization, started at real-word activations
    prefix_forward.py  HF's forward with a prefix as its KV cache (the training forward)
    trainer.py         TrainConfig, train_prefix(): examples in, kv [L, 2, Hkv, P, hd] out
    seq2seq_forward.py BART/T5 teacher-forced forward with a three-prefix (the engine's semantics)
    seq2seq_trainer.py train_three_prefix(): decoder, encoder and cross parts, one MLP each
    job_spec.py        JobSpec: what a personalization job trains (the route writes it)
    worker.py          the personalization worker: job queue in, user prefix published
    supervisor.py      worker processes that `serve` starts and restarts
    bleu.py            multi-reference BLEU (sacrebleu)
    evaluate.py        greedy generation through the serving engine, scored by BLEU

Trained prefixes are written as PEFT adapters by server/prefix/peft_format.py.
"""
