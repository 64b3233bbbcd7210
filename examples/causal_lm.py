"""A small causal language model with a 128k vocabulary: a stock transformers Llama against the
same model patched by lossforge in one line (its loss from the hidden states and the lm_head
weight, never the (tokens x vocabulary) logits). Needs `pip install -e ".[transformers]"`.

Synthetic tokens: a random sequence per step (no downloads); the model is built from a config.

    python examples/causal_lm.py                          # on a GPU: 8 x 1024 tokens, vocabulary 128256
    python examples/causal_lm.py --device cpu --steps 5 --vocab 1000 --seq 64 --batch 2
"""
from __future__ import annotations

import torch

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common


def main(argv=None):
    args = common.arguments(__doc__.splitlines()[0], 50, argv, batch=8, seq=1024, vocab=128256, hidden=512,
                            layers=4)
    from transformers import LlamaConfig, LlamaForCausalLM

    from lossforge_kernels.integrations.transformers import patch

    device = torch.device(args.device)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq)

    def batches(step):
        gen = torch.Generator().manual_seed(400 + step)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
        return ids, ids

    def loss_fn(model, ids, labels):
        return model(input_ids=ids, labels=labels).loss

    runs = [common.train("transformers", lambda: LlamaForCausalLM(config), batches, loss_fn, args.steps, device),
            common.train("lossforge", lambda: patch(LlamaForCausalLM(config), backend=args.backend), batches,
                         loss_fn, args.steps, device)]
    common.report("causal_lm", runs, args.out, args.device)
    return runs


if __name__ == "__main__":
    main()
