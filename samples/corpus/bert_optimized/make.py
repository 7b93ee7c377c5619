"""How ``bert_optimized.onnx`` was made: a small Hugging Face BERT classifier exported by torch's TorchScript
exporter as optimum exports it, then fused by onnxruntime's transformer optimizer. Run it only to remake it;
the tests read the committed file.

It needs ``transformers`` (4.57.6 made the committed file), which the project does not depend on:
``pip install --target DIR transformers==4.57.6`` and ``PYTHONPATH=DIR python samples/corpus/bert_optimized/make.py
OUT_DIR``.

The model: ``BertForSequenceClassification`` (1 layer, hidden 32, 2 heads, feed-forward 64, vocabulary 60,
3 classes), trained 400 Adam steps (seed 0) on a synthetic task, ``tokens``: which of three bands of token ids
is most frequent among a sequence's unmasked tokens; inputs ``input_ids``, ``attention_mask``,
``token_type_ids`` [batch, sequence], int64, dynamic. ``optimize_model(model_type="bert")`` writes EmbedLayerNormalization (the mask's
lengths as its mask_index), Attention (the packed q/k/v weights), SkipLayerNormalization and BiasGelu.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from onnxruntime.transformers import optimizer
from transformers import BertConfig, BertForSequenceClassification


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def tokens(n: int, seed: int, length: int = 12):
    """``n`` sequences of 4 to ``length`` tokens (ids 5-59, 0 as padding), their masks and band labels."""
    r = np.random.default_rng(seed)
    mask = (np.arange(length)[None] < r.integers(4, length + 1, n)[:, None]).astype(np.int64)
    ids = r.integers(5, 60, (n, length)) * mask
    counts = np.stack([((ids >= 5 + 19 * k) & (ids < 24 + 19 * k) & (mask == 1)).sum(1) for k in range(3)], 1)
    return ids, mask, counts.argmax(1)


def main() -> None:
    out = Path(sys.argv[1])
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    bert = BertForSequenceClassification(config)
    ids, mask, labels = (torch.tensor(a) for a in tokens(4000, 0))
    opt = torch.optim.Adam(bert.parameters(), 2e-3)
    for _ in range(400):
        pick = torch.randint(0, 4000, (64,))
        loss = bert(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = _Logits(bert.eval())
    held_ids, held_mask, held_labels = tokens(600, 1)
    with torch.no_grad():
        logits = model(torch.tensor(held_ids), torch.tensor(held_mask), torch.zeros(600, 12, dtype=torch.long))
    print(f"held-out accuracy {(logits.argmax(1).numpy() == held_labels).mean():.3f}")
    ids = torch.randint(5, 60, (2, 12))
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
    plain = out / "bert_plain.onnx"
    torch.onnx.export(model, example, str(plain), dynamo=False, opset_version=14, input_names=names,
                      output_names=["logits"], dynamic_axes=axes)
    fused = optimizer.optimize_model(str(plain), model_type="bert", num_heads=2, hidden_size=32)
    fused.save_model_to_file(str(out / "bert_optimized.onnx"))


if __name__ == "__main__":
    main()
