"""How ``bert_optimized.onnx`` was made: a small Hugging Face BERT classifier exported by torch's TorchScript
exporter as optimum exports it, then fused by onnxruntime's transformer optimizer. Run it only to remake it;
the tests read the committed file.

It needs ``transformers`` (4.57.6 made the committed file), which the project does not depend on:
``pip install --target DIR transformers==4.57.6`` and ``PYTHONPATH=DIR python samples/corpus/bert_optimized/make.py
OUT_DIR``.

The model: ``BertForSequenceClassification`` (1 layer, hidden 32, 2 heads, feed-forward 64, vocabulary 60,
3 classes), random weights (seed 0); inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` [batch,
sequence], int64, dynamic. ``optimize_model(model_type="bert")`` writes EmbedLayerNormalization (the mask's
lengths as its mask_index), Attention (the packed q/k/v weights), SkipLayerNormalization and BiasGelu.
"""

import sys
import warnings
from pathlib import Path

import torch
from onnxruntime.transformers import optimizer
from transformers import BertConfig, BertForSequenceClassification


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def main() -> None:
    out = Path(sys.argv[1])
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = _Logits(BertForSequenceClassification(config).eval())
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
