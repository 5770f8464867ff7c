"""Seq2seq prefixes (issue 20): a mixed batch of requests, each on its own PEFT SEQ_2_SEQ_LM
prefix, served by PrefixSeq2Seq (server/engine/seq2seq.py) in one batch, against PEFT.

    .venv/bin/python bench/seq2seq_bench.py        # about 15 minutes on 2 cores

The model is a BART built from a config with random weights (no BART or T5 checkpoint ships
in the packages here): bart-base's depth and vocabulary at two thirds of its width, d_model
512, 6 encoder + 6 decoder layers, 8 heads, FFN 2048, vocab 50265, 1024 positions, tied
embeddings (71 M parameters; bart-base's full shape, --d-model 768 --heads 12 --ffn 3072,
took 98 s for our one batch alone on the shared 2 cores).
Each of the 64 requests has its own prefix (P=16), made with PEFT (`get_peft_model`,
`save_pretrained`) and filled at random with the spread of the model's own decoder
self-attention keys and values (their std over a few random inputs), so a prefix moves the
logits as much as real keys do. Inputs are random token ids, 64-128 tokens each; 32 new
tokens, greedy, EOS disabled (every row makes all its tokens). The weights are drawn with
std 0.1 (init_std): at bart-base's 0.02 a random BART answers token 2 to every input, with
or without a prefix, which would make the token comparison empty.

Four ways to run the same input ids, in float32 and bfloat16:
  ours          PrefixSeq2Seq.generate on all 64 rows, each with its prefix, in one call
  served        the serving loop: Seq2SeqCore (the seq2seq engine process's core, as `serve`
                runs it, without the pipe and HTTP) given the 64 requests at once, each on its
                own prefix, stepped until all end: encoder admission within the step's token
                budget, continuous batching of the decoder steps
  peft          what PEFT can do: a PeftModel with the 64 adapters loaded, `set_adapter` and
                `generate` one request at a time (it cannot mix prefixes in a batch)
  hf_no_prefix  the base model's HF `generate` on the 64 rows as one static batch (right
                padded, masked) without prefixes: the batching ceiling, not the same output
The tokens of ours and peft are compared row by row (float32 must match exactly). Times are
the median of --repeats runs (--peft-repeats for peft, whose one run is already 64 calls)
after a warm-up; tokens/s counts generated tokens. --peft-requests N runs PEFT on the first
N requests only (its time scaled to all, its tokens compared on those N).
Writes bench/results/seq2seq_bench.json (--out).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))
from engine_bench import cpu_model  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.engine_core import AddRequest, PrefixPayload  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from server.engine.seq2seq import PrefixSeq2Seq, Seq2SeqInput  # noqa: E402
from server.engine.seq2seq_core import Seq2SeqCore  # noqa: E402
from server.prefix import PrefixRef  # noqa: E402
from server.prefix.peft_format import read_adapter  # noqa: E402

RESULTS = REPO / "bench" / "results" / "seq2seq_bench.json"


def build_bart(args):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=args.vocab, d_model=args.d_model, encoder_layers=args.layers,
                     decoder_layers=args.layers, encoder_attention_heads=args.heads,
                     decoder_attention_heads=args.heads, encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn,
                     max_position_embeddings=1024, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                     forced_bos_token_id=None, forced_eos_token_id=None, init_std=0.1)
    return BartForConditionalGeneration(cfg).eval()


def no_eos(model) -> None:
    """HF generate without an eos: it makes max_new_tokens for every row."""
    gc = model.generation_config
    gc.eos_token_id = None
    gc.forced_bos_token_id = gc.forced_eos_token_id = None
    gc.pad_token_id = model.config.pad_token_id
    gc.decoder_start_token_id = model.config.decoder_start_token_id


@torch.inference_mode()
def kv_std(model, seed: int = 1) -> float:
    """The std of the decoder's self-attention keys and values on random inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (4, 48), generator=g)
    dec = torch.randint(3, model.config.vocab_size, (4, 16), generator=g)
    cache = model(input_ids=ids, decoder_input_ids=dec, use_cache=True).past_key_values.self_attention_cache
    return float(torch.cat([t.flatten() for layer in cache.layers for t in (layer.keys, layer.values)]).std())


def make_adapters(base, count: int, plen: int, std: float, folder: Path) -> list[Path]:
    from peft import PrefixTuningConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=plen))
    out = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            peft.prompt_encoder["default"].embedding.weight.normal_(0, std)
        peft.save_pretrained(folder / f"a{i}")
        out.append(folder / f"a{i}")
    return out


def inputs(n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def timed(fn, repeats: int):
    """(the last result, the median seconds of `repeats` runs)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main() -> None:
    from peft import PeftModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50265)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--min-input", type=int, default=64)
    ap.add_argument("--max-input", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peft-repeats", type=int, default=1)
    ap.add_argument("--peft-requests", type=int, default=None,
                    help="run PEFT (one request at a time) on the first N requests only; its time is "
                         "scaled to all of them and its tokens compared on those N (default: all)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    base = build_bart(args)
    no_eos(base)
    std = kv_std(base)
    folders = make_adapters(base, args.requests, args.prefix_len, std, Path(tempfile.mkdtemp(prefix="s2s-bench-")))
    rows = inputs(args.requests, args.min_input, args.max_input, args.vocab)
    n_new = args.new_tokens
    results = {
        "model": f"BART from a config, random weights: d_model {args.d_model}, {args.layers}+{args.layers} layers, "
                 f"{args.heads} heads, ffn {args.ffn}, vocab {args.vocab}",
        "parameters": sum(p.numel() for p in base.parameters()),
        "requests": args.requests, "prefixes": len(folders), "num_virtual_tokens": args.prefix_len,
        "prefix_value_std": round(std, 4), "input_tokens": [args.min_input, args.max_input],
        "new_tokens": n_new, "greedy": True, "eos": "disabled", "threads": torch.get_num_threads(),
        "repeats": args.repeats, "peft_repeats": args.peft_repeats, "machine": cpu_model(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "speed": {},
    }
    print(results, flush=True)

    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        engine = PrefixSeq2Seq(copy.deepcopy(base).to(dtype))
        engine.eos_token_ids = frozenset()  # the bench's "EOS disabled" (the model's eos is 2)
        kvs = [read_adapter(f, engine.spec) for f in folders]
        batch = [Seq2SeqInput(ids, kv, max_new_tokens=n_new) for ids, kv in zip(rows, kvs)]
        peft = PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="a0").eval()
        for i, f in enumerate(folders[1:], 1):
            peft.load_adapter(f, adapter_name=f"a{i}")
        peft = peft.to(dtype)
        hf = copy.deepcopy(base).to(dtype)
        padded = torch.full((len(rows), max(map(len, rows))), base.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(padded)
        for i, ids in enumerate(rows):
            padded[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1

        def run_ours():
            return [o.token_ids for o in engine.generate(batch)]

        def run_served():
            core = Seq2SeqCore(engine, None, EngineConfig())
            refs = [(PrefixRef("bench", f"p{i}", "v1"),) for i in range(len(rows))]
            core.apply([AddRequest(f"r{i}", ids, SamplingParams(max_tokens=n_new, ignore_eos=True),
                                   PrefixPayload(refs[i], refs[i], kv), 0.0, False, tenant="bench")
                        for i, (ids, kv) in enumerate(zip(rows, kvs))])
            tokens: dict[str, list[int]] = {}
            while core.has_unfinished():
                out = core.step()
                assert not out.rejected, out.rejected
                for o in out.outputs:
                    tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            return [tokens[f"r{i}"] for i in range(len(rows))]

        peft_rows = rows[:args.peft_requests] if args.peft_requests else rows

        @torch.inference_mode()
        def run_peft():
            out = []
            for i, ids in enumerate(peft_rows):
                peft.set_adapter(f"a{i}")
                x = torch.tensor([ids])
                out.append(peft.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                         num_beams=1, max_new_tokens=n_new)[0, 1:].tolist())
            return out

        @torch.inference_mode()
        def run_hf():
            out = hf.generate(input_ids=padded, attention_mask=mask, do_sample=False, num_beams=1,
                              max_new_tokens=n_new)
            return out[:, 1:].tolist()

        # warm-up: a few rows each
        engine.generate(batch[:4])
        with torch.inference_mode():
            peft.set_adapter("a0")
            peft.generate(input_ids=torch.tensor([rows[0]]), max_new_tokens=4)
            hf.generate(input_ids=padded[:4], attention_mask=mask[:4], max_new_tokens=4)
        run_served()
        ours, ours_s = timed(run_ours, args.repeats)
        print(name, "ours", round(ours_s, 2), flush=True)
        served, served_s = timed(run_served, args.repeats)
        print(name, "served", round(served_s, 2), flush=True)
        hf_tokens, hf_s = timed(run_hf, args.repeats)
        print(name, "hf_no_prefix", round(hf_s, 2), flush=True)
        reference, peft_s = timed(run_peft, args.peft_repeats)
        peft_s *= len(rows) / len(peft_rows)  # one request at a time: its time grows with the count
        print(name, "peft", round(peft_s, 2), flush=True)

        assert all(len(t) == n_new for t in ours + served + reference + hf_tokens), "a row stopped early"
        mismatched = [i for i, (a, b) in enumerate(zip(ours, reference)) if a != b]
        first_diff = [next(k for k, (x, y) in enumerate(zip(ours[i], reference[i])) if x != y) for i in mismatched]
        total = args.requests * n_new
        results["speed"][name] = {
            "prefix_serve_s": round(ours_s, 3), "peft_one_prefix_at_a_time_s": round(peft_s, 3),
            "hf_static_batch_no_prefix_s": round(hf_s, 3),
            "prefix_serve_tokens_per_s": round(total / ours_s, 1), "peft_tokens_per_s": round(total / peft_s, 1),
            "hf_no_prefix_tokens_per_s": round(total / hf_s, 1),
            "served_s": round(served_s, 3), "served_tokens_per_s": round(total / served_s, 1),
            "served_speedup_vs_hf_no_prefix": round(hf_s / served_s, 2),
            "served_speedup_vs_peft": round(peft_s / served_s, 2),
            "peft_requests_run": len(peft_rows), "rows_compared_with_peft": len(reference),
            "served_rows_differing_from_peft": sum(a != b for a, b in zip(served, reference)),
            "speedup_vs_peft": round(peft_s / ours_s, 2), "speedup_vs_hf_no_prefix": round(hf_s / ours_s, 2),
            "rows_differing_from_peft": len(mismatched),
            "tokens_differing_from_peft": sum(a != b for i in mismatched for a, b in zip(ours[i], reference[i])),
            "first_differing_step": first_diff,
            "rows_where_the_prefix_changed_the_tokens": sum(a != b for a, b in zip(ours, hf_tokens)),
            "distinct_outputs": len({tuple(t) for t in ours}),
        }
        print(name, results["speed"][name], flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after each dtype: a long run keeps its first
        print(f"wrote {args.out}")
        if name == "float32":
            assert not mismatched, f"float32 tokens differ from PEFT in rows {mismatched}"
            assert served[:len(reference)] == reference, "float32 tokens of the serving loop differ from PEFT"
        del engine, peft, hf


if __name__ == "__main__":
    main()
